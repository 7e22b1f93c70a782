"""Specification of the reproduction tables (evaluate.py): run folders ``<name>/seed<k>/metrics.json``
become mean ± std Markdown tables and the paper's claims as paired differences; the runner
(``train.py --reproduce``) runs every experiment's flags end to end."""
import json

import pytest

import evaluate
import train

SMH = ("seen_miou", "unseen_miou", "harmonic_miou")


def metrics(stages: dict, *, sky=90.0, water=80.0) -> dict:
    """A metrics.json as train.py writes it: {stage: {test: {S, U, H, per_class}}}, test "64" with
    the given values and test "128" with every value 10 lower, so the two sizes cannot be mixed up."""
    return {stage: {test: dict(zip(SMH, [v - low for v in values]),
                               per_class={"sky": sky - low, "water": water - low, "grass": 99.0})
                    for test, low in (("64", 0), ("128", 10))} for stage, values in stages.items()}


def same(stored, flag: str) -> bool:
    try:
        return float(stored) == float(flag)
    except (TypeError, ValueError):
        return str(stored) == flag


def write(root, name, seed, m):
    run = root / name / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(m))


@pytest.mark.tables
def test_mean_std_is_the_sample_standard_deviation():
    assert evaluate.mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert evaluate.mean_std([10.0, 14.0]) == "12.00 ± 2.83"
    assert evaluate.mean_std([42.0]) == "42.00"  # one seed: no spread to report
    assert evaluate.mean_std([]) == "–"


@pytest.mark.tables
def test_collect_runs_reads_every_seed_and_skips_folders_without_metrics(tmp_path):
    write(tmp_path, "sign", 0, metrics({"transfer": (70, 40, 50.9)}))
    write(tmp_path, "sign", 3, metrics({"transfer": (72, 42, 53.0)}))
    (tmp_path / "sign" / "seed5").mkdir()  # an interrupted run: no metrics.json yet
    runs = evaluate.collect_runs(tmp_path)
    assert set(runs) == {"sign"} and set(runs["sign"]) == {0, 3}


@pytest.mark.tables
def test_tables_hold_mean_and_std_over_seeds_in_every_table(tmp_path):
    for seed, (h_sign, h_zs3) in enumerate([(50.0, 30.0), (54.0, 34.0)]):
        write(tmp_path, "sign", seed, metrics({"train": (75, 0, 0), "transfer": (70, 40, h_sign)}, sky=95.0))
        write(tmp_path, "zs3net", seed, metrics({"train": (71, 0, 0), "transfer": (65, 20, h_zs3)}, sky=60.0))
        write(tmp_path, "pe-ape", seed, metrics({"transfer": (70, 38, 49.0)}, sky=70.0, water=70.0))
        write(tmp_path, "sign-ast-T2", seed, metrics({"transfer": (70, 40, h_sign), "self_training": (72, 50, 59.0)}))
    text = evaluate.reproduction_tables(tmp_path)
    lines = text.splitlines()
    row = lambda label: next(line for line in lines if line.startswith(f"| {label} |"))
    # Table 1: SIGN after the transfer step, seen / unseen / H at 64 then at 128
    assert row("SIGN") == ("| SIGN | 2 | 70.00 ± 0.00 | 40.00 ± 0.00 | 52.00 ± 2.83 "
                           "| 60.00 ± 0.00 | 30.00 ± 0.00 | 42.00 ± 2.83 |")
    assert row("SIGN + AST (T = 2)").startswith("| SIGN + AST (T = 2) | 2 | 72.00 ± 0.00 | 50.00 ± 0.00 | 59.00 ± 0.00 |")
    assert row("CaGNet").startswith("| CaGNet | 0 | – |")  # missing runs show as such, not as 0
    # Table 3: sky/water is the mean IoU of the two classes
    assert row("APE").endswith("| 60.00 ± 0.00 |") and row("RPE").endswith("| 77.50 ± 0.00 |")
    # Table 4: seen mIoU before the transfer step, without SIM (ZS3Net's run) and with multihead (SIGN's)
    assert row("64") == "| 64 | 71.00 ± 0.00 | – | – | – | 75.00 ± 0.00 |"
    assert row("128") == "| 128 | 61.00 ± 0.00 | – | – | – | 65.00 ± 0.00 |"
    assert lines.index(row("64")) < lines.index(row("128"))  # test sizes in numeric order
    # the claims, paired by seed: SIGN - ZS3Net is +20 in both seeds (no spread: a zero-width interval)
    assert row("SIGN > ZS3Net (Table 1)") == (
        "| SIGN > ZS3Net (Table 1) | 64 | harmonic | 2 | 52.00 ± 2.83 | 32.00 ± 2.83 | +20.00 ± 0.00 | "
        "[+20.00, +20.00] | 2 of 2 | supported |")
    assert row("AST > ST (Fig. 5)").endswith(
        "| 0 | – | – | – | – | – | needs >= 2 seeds with both sign-ast-T2 and sign-st |")


@pytest.mark.tables
def test_paired_difference_is_the_mean_of_the_per_seed_gaps_with_a_t_interval():
    p = evaluate.paired_difference([52.0, 50.0, 61.0], [50.0, 47.0, 57.0])  # gaps 2, 3, 4
    se = 1 / 3 ** 0.5  # s_d / sqrt(n), s_d = 1
    assert p["mean"] == pytest.approx(3.0) and p["se"] == pytest.approx(se)
    assert (p["low"], p["high"]) == pytest.approx((3 - 4.303 * se, 3 + 4.303 * se))  # t(0.975, df 2) = 4.303
    assert (p["agree"], p["n"], p["reading"]) == (3, 3, "supported")
    # every seed agrees, but gaps 2, 1, 6 leave 0 inside the interval: three seeds cannot tell
    assert evaluate.paired_difference([52.0, 50.0, 61.0], [50.0, 49.0, 55.0])["reading"] == "not supported"
    # the unpaired spread (std 5.6 and 3.2) would hide a gap that every seed shows
    assert evaluate.paired_difference([50.0, 40.0], [49.0, 41.0])["reading"] == "not supported"
    assert evaluate.paired_difference([40.0, 41.0, 39.0], [45.0, 45.5, 44.0])["reading"] == "contradicted"
    assert evaluate.paired_difference(list(range(40)), [v - 1.0 for v in range(40)])["high"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs >= 2 paired seeds"):
        evaluate.paired_difference([1.0], [2.0])


@pytest.mark.tables
def test_claims_pair_seeds_read_the_right_stage_and_size_and_drop_unpaired_seeds(tmp_path):
    for seed, (h_sign, h_ape, sky_ape) in enumerate([(50.0, 40.0, 50.0), (54.0, 47.0, 60.0), (58.0, 47.0, 70.0)]):
        m = metrics({"train": (75 + seed, 0, 0), "transfer": (70, 40, h_sign)})
        write(tmp_path, "sign", seed, m)
        ape = metrics({"transfer": (70, 40, 99.0)})  # H at 64 is not what the claim reads
        ape["transfer"]["128"].update(harmonic_miou=h_ape - 10)
        ape["transfer"]["128"]["per_class"]["sky"] = sky_ape
        write(tmp_path, "pe-ape", seed, ape)
    write(tmp_path, "zs3net", 0, metrics({"train": (71, 0, 0), "transfer": (65, 20, 30.0)}))
    write(tmp_path, "zs3net", 1, metrics({"train": (70, 0, 0), "transfer": (65, 20, 31.0)}))
    write(tmp_path, "zs3net", 7, metrics({"train": (90, 0, 0), "transfer": (65, 20, 99.0)}))  # no SIGN seed 7
    lines = evaluate.reproduction_tables(tmp_path).splitlines()
    row = lambda label: next(line for line in lines if line.startswith(f"| {label} |")).split(" | ")
    assert row("SIGN > ZS3Net (Table 1)")[3:7] == ["2", "52.00 ± 2.83", "30.50 ± 0.71", "+21.50 ± 1.50"]
    seen = row("SIM helps seen classes (Table 4)")  # stage 1, seen mIoU: 75, 76 against 71, 70
    assert seen[2:7] == ["seen", "2", "75.50 ± 0.71", "70.50 ± 0.71", "+5.00 ± 1.00"]
    h128 = row("RPE > APE at a new size (Table 3)")  # at 128: sign 40, 44, 48 against 30, 37, 37
    assert h128[1] == "128" and h128[6:9] == ["+9.33 ± 1.20", "[+4.16, +14.50]", "3 of 3"]
    sky = row("RPE > APE at a new size, sky/water (Table 3)")  # at 128: (80 + 70) / 2 against (sky + 70) / 2
    assert sky[6] == "+10.00 ± 2.89" and sky[-1] == "not supported |"


@pytest.mark.tables
def test_an_unfinished_seed_is_counted_apart_and_a_single_seed_cannot_pass_the_spread_bar(tmp_path):
    write(tmp_path, "sign", 0, metrics({"train": (75, 0, 0), "transfer": (70, 40, 50.0)}))
    write(tmp_path, "sign", 1, metrics({"train": (77, 0, 0)}))  # stopped during the transfer step
    write(tmp_path, "zs3net", 0, metrics({"train": (71, 0, 0), "transfer": (65, 20, 30.0)}))
    text = evaluate.reproduction_tables(tmp_path)
    assert "| SIGN | 1 | 70.00 | 40.00 | 50.00 |" in text  # 1 seed finished the transfer step
    assert "| 64 | 71.00 | – | – | – | 76.00 ± 1.41 |" in text  # both finished stage 1
    assert "| SIGN > ZS3Net (Table 1) | 64 | harmonic | 1 | – |" in text  # one paired seed: no interval


@pytest.mark.tables
def test_a_cell_missing_a_seed_of_its_row_says_how_many_it_averages(tmp_path):
    write(tmp_path, "pe-ape", 0, metrics({"transfer": (70, 40, 50.0)}))
    m = metrics({"transfer": (70, 40, 50.0)})
    del m["transfer"]["64"]["per_class"]["water"]  # water has no IoU in this seed's 64 test
    write(tmp_path, "pe-ape", 1, m)
    assert ("| APE | 2 | 70.00 ± 0.00 | 40.00 ± 0.00 | 50.00 ± 0.00 | 85.00 (n = 1) |"
            in evaluate.reproduction_tables(tmp_path))


@pytest.mark.tables
def test_tables_cli_writes_markdown_and_an_empty_folder_is_an_error(tmp_path, capsys):
    assert evaluate.main(["--tables", str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err
    write(tmp_path, "sign", 0, metrics({"transfer": (70, 40, 50.9)}))
    assert evaluate.main(["--tables", str(tmp_path)]) == 0
    assert "**Table 1**" in (tmp_path / "tables.md").read_text()
    (tmp_path / "sign" / "seed1").mkdir()
    (tmp_path / "sign" / "seed1" / "metrics.json").write_text('{"train": ')  # a truncated file
    assert evaluate.main(["--tables", str(tmp_path)]) == 2
    assert f"{tmp_path / 'sign' / 'seed1' / 'metrics.json'} is not valid JSON" in capsys.readouterr().err


@pytest.mark.tables
def test_reproduce_refuses_the_flags_it_sets_itself_and_unknown_experiments(tmp_path, capsys):
    assert train.main(["--reproduce", str(tmp_path), "--seed", "3"]) == 2  # --seed is not --seeds
    assert "--reproduce sets ['--seed'] itself" in capsys.readouterr().err
    assert train.main(["--reproduce", str(tmp_path), "--experiments", "sign", "nonsense"]) == 2
    assert "--experiments: unknown ['nonsense']" in capsys.readouterr().err
    assert train.main(["--reproduce", str(tmp_path), "--lr", "fast"]) == 2  # a bad train.py flag, before any run
    assert "--lr: invalid float value" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.tables
def test_every_self_training_run_starts_from_its_base_run_with_the_same_model_flags():
    for name, (flags, base) in train.EXPERIMENTS.items():
        assert (base is not None) == (flags[flags.index("--self-training") + 1] != "none"), name
        if base:
            model_flags = train.EXPERIMENTS[base][0][:-2]  # without its "--self-training none"
            assert flags[:len(model_flags)] == model_flags, name
    assert set(train.CLAIMED) <= set(train.EXPERIMENTS)
    used = {name for _, (a, _), (b, _), _, _ in evaluate.CLAIMS for name in (a, b)}
    assert used == set(train.CLAIMED)  # the claims compare exactly the runs "--experiments claimed" makes


def test_latent_sim_without_a_sim_is_refused(capsys):
    assert train.main(["--sim", "none", "--latent", "sim"]) == 2
    assert "--latent noise" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_runs_every_baseline_and_fills_every_table(tmp_path, capsys):
    tiny = ["--num-train", "8", "--num-test", "2", "--crop-size", "32", "--test-sizes", "32", "48",
            "--batch-size", "4", "--feat-dim", "16", "--pe-dim", "8", "--heads", "2", "--hidden", "16",
            "--small-width", "8", "--iters", "2", "--transfer-iters", "2", "--self-training-iters", "2",
            "--device", "cpu"]
    assert train.main(["--reproduce", str(tmp_path), "--seeds", "0", *tiny]) == 0
    out = capsys.readouterr().out
    assert f"[{len(train.EXPERIMENTS)}/{len(train.EXPERIMENTS)}]" in out and "wall time" in out
    runs = evaluate.collect_runs(tmp_path)
    assert set(runs) == set(train.EXPERIMENTS)
    for name, (flags, _) in train.EXPERIMENTS.items():
        config = json.loads((tmp_path / name / "seed0" / "config.json").read_text())
        for flag, value in zip(flags[::2], flags[1::2]):  # every flag reached train.py
            assert same(config[flag[2:].replace("-", "_")], value), (name, flag)
        assert evaluate.final_stage(runs, name) in runs[name][0]
    assert json.loads((tmp_path / "zs3net" / "seed0" / "config.json").read_text())["latent"] == "noise"
    assert json.loads((tmp_path / "sign" / "seed0" / "config.json").read_text())["latent"] == "sim"
    for name, (_, base) in train.EXPERIMENTS.items():  # self-training starts from its base run's transfer step
        if base:
            config = json.loads((tmp_path / name / "seed0" / "config.json").read_text())
            assert config["init_from"] == str(tmp_path / base / "seed0" / "checkpoint_transfer.pt")
            assert runs[name][0]["transfer"] == runs[base][0]["transfer"]
    tables = (tmp_path / "tables.md").read_text()
    assert "| 0 |" not in tables  # every row found its run
    assert all("–" not in line for line in tables.splitlines() if line.startswith(("| 32 |", "| 48 |")))  # Table 4
    # an interrupted run (checkpoints, no final metrics) resumes; a finished one is not retrained
    (tmp_path / "sign-st" / "seed0" / "metrics.json").unlink()
    (tmp_path / "sign-st" / "seed0" / "checkpoint_self_training_transfer.pt").unlink()
    # a second call finds every run finished and retrains nothing
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed0/metrics.json")}
    assert train.main(["--reproduce", str(tmp_path), "--seeds", "0", *tiny]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed0/metrics.json")
                      if p.parent.parent.name != "sign-st"}
    assert evaluate.collect_runs(tmp_path)["sign-st"][0] == runs["sign-st"][0]  # resumed to the same metrics
    # other settings over an existing folder are refused, naming the run and the difference
    assert train.main(["--reproduce", str(tmp_path), "--seeds", "0", *tiny, "--iters", "3"]) == 2
    assert "iters: 2 there, 3 now" in capsys.readouterr().err


@pytest.mark.tables
def test_a_run_folder_made_with_other_settings_is_refused_naming_the_setting(tmp_path):
    argv = ["--iters", "2", "--seed", "0", "--out", str(tmp_path / "sign" / "seed0"), "--quiet"]
    args = train.resolve(train.get_args_parser().parse_args(argv))
    (tmp_path / "sign" / "seed0").mkdir(parents=True)
    (tmp_path / "sign" / "seed0" / "config.json").write_text(json.dumps({**vars(args), "alpha": 3.0}))
    with pytest.raises(ValueError, match="alpha: 3.0 there"):
        train.reproduce(tmp_path, [0], ["--iters", "2"], names=["sign"])


@pytest.mark.tables
@pytest.mark.parametrize("content", ["[]", "null", "3"])
def test_a_metrics_file_that_is_not_an_object_is_one_line_naming_it(content, tmp_path, capsys):
    write(tmp_path, "sign", 0, metrics({"transfer": (70, 40, 50.0)}))
    (tmp_path / "sign" / "seed0" / "metrics.json").write_text(content)
    assert evaluate.main(["--tables", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'sign' / 'seed0' / 'metrics.json'} holds {content};" in err


def settings(seed, **changed):  # a config.json as train.py writes it
    return {"alpha": 10.0, "iters": 2000, "test_sizes": [64, 128], "seed": seed, "out": f"runs/sign/seed{seed}",
            "device": "cpu", "quiet": True, "resume": None, "init_from": None} | changed


UNUSABLE = {  # a run's metrics.json (or config.json) -> what its note says
    "lacks per_class": (lambda m: m["transfer"]["64"].pop("per_class"), "KeyError 'per_class'"),
    "lacks seen_miou": (lambda m: m["transfer"]["128"].pop("seen_miou"), "KeyError 'seen_miou'"),
    "numeric stage": (lambda m: m.update(transfer=5), "'int' object has no attribute 'items'"),
    "unknown stage": (lambda m: m.update({"1": m["transfer"]}), "stage '1' unknown"),
    "nan": (lambda m: m["transfer"]["64"].update(harmonic_miou=float("nan")), "transfer 64 harmonic_miou is nan"),
    "inf": (lambda m: m["transfer"]["64"]["per_class"].update(sky=float("inf")), "transfer 64 sky is inf"),
    "other test sets": (lambda m: m["transfer"].update({"32": m["transfer"].pop("64")}),
                        "test sets ['128', '32'], most runs' ['128', '64']"),
    "other settings": (None, "settings unlike most runs of its name: alpha 3.0, iters 5"),
}


@pytest.mark.tables
@pytest.mark.parametrize("kind", UNUSABLE)
def test_a_run_the_tables_cannot_use_is_left_out_with_a_note_naming_it(kind, tmp_path, capsys):
    change, note = UNUSABLE[kind]
    for root in (tmp_path / "all", tmp_path / "without"):  # the same runs, one more in "all"
        for seed, h in enumerate([50.0, 54.0]):
            write(root, "sign", seed, metrics({"transfer": (70, 40, h)}))
            (root / "sign" / f"seed{seed}" / "config.json").write_text(json.dumps(settings(seed)))
        write(root, "zs3net", 0, metrics({"transfer": (65, 20, 30.0)}))
    m = metrics({"transfer": (70, 40, 99.0)})
    if change:
        change(m)
    write(tmp_path / "all", "sign", 2, m)
    bad = tmp_path / "all" / "sign" / "seed2"
    (bad / "config.json").write_text(json.dumps(settings(2) if change else settings(2, alpha=3.0, iters=5)))
    assert evaluate.main(["--tables", str(tmp_path / "all")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tables: left out {bad}: ") and note in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "all" / "tables.md").read_text() == evaluate.reproduction_tables(tmp_path / "without") + "\n"


@pytest.mark.tables
def test_two_folders_of_one_seed_are_one_line_naming_both(tmp_path, capsys):
    for folder in ("seed0", "seed00"):
        (tmp_path / "sign" / folder).mkdir(parents=True)
        (tmp_path / "sign" / folder / "metrics.json").write_text(json.dumps(metrics({"transfer": (70, 40, 50.0)})))
    assert evaluate.main(["--tables", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(str(tmp_path / "sign" / f) in err for f in ("seed0", "seed00")), err
