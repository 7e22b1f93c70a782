"""Specification of the reproduction tables (evaluate.py): run folders ``<name>/seed<k>/metrics.json``
become mean ± std Markdown tables and the three bars; every baseline's flags run end to end."""
import json

import pytest

import evaluate
import train

SMH = ("seen_miou", "unseen_miou", "harmonic_miou")


def metrics(stages: dict, *, sky=90.0, water=80.0) -> dict:
    """A metrics.json as train.py writes it: {stage: {test: {S, U, H, per_class}}} for tests 64 and 128."""
    return {stage: {test: dict(zip(SMH, values), per_class={"sky": sky, "water": water, "grass": 99.0})
                    for test in ("64", "128")} for stage, values in stages.items()}


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
                           "| 70.00 ± 0.00 | 40.00 ± 0.00 | 52.00 ± 2.83 |")
    assert "| SIGN + AST (T = 2) | 2 | 72.00 ± 0.00 | 50.00 ± 0.00 | 59.00 ± 0.00 |" in text
    assert row("CaGNet").startswith("| CaGNet | 0 | – |")  # missing runs show as such, not as 0
    # Table 3: sky/water is the mean IoU of the two classes
    assert row("APE").endswith("| 70.00 ± 0.00 |") and row("RPE").endswith("| 87.50 ± 0.00 |")
    # Table 4: seen mIoU before the transfer step, without SIM (ZS3Net's run) and with multihead (SIGN's)
    assert row("64") == "| 64 | 71.00 ± 0.00 | – | – | – | 75.00 ± 0.00 |"
    assert text.index("64 |") < text.index("128 |")  # test sizes in numeric order
    # the bars: SIGN - ZS3Net = 20 > 2.83; RPE 87.5 >= APE 70 + 5 but no-PE runs are missing; AST 59 > 52
    assert "- holds: SIGN H 52.00 - ZS3Net H 32.00 > max std 2.83" in text
    assert "- FAILS: RPE sky/water 87.50 >= APE 70.00 + 5 and > no PE nan" in text
    assert "- holds: SIGN + AST H 59.00 > SIGN H 52.00" in text


@pytest.mark.tables
def test_a_gap_within_one_standard_deviation_fails_the_first_bar(tmp_path):
    for seed, (h_sign, h_zs3) in enumerate([(50.0, 48.0), (60.0, 50.0)]):  # gap 6 < std 7.07
        write(tmp_path, "sign", seed, metrics({"transfer": (70, 40, h_sign)}))
        write(tmp_path, "zs3net", seed, metrics({"transfer": (70, 30, h_zs3)}))
    assert "- FAILS: SIGN H 55.00 - ZS3Net H 49.00 > max std 7.07" in evaluate.reproduction_tables(tmp_path)


@pytest.mark.tables
def test_tables_cli_writes_markdown_and_an_empty_folder_is_an_error(tmp_path, capsys):
    assert evaluate.main(["--tables", str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err
    write(tmp_path, "sign", 0, metrics({"transfer": (70, 40, 50.9)}))
    assert evaluate.main(["--tables", str(tmp_path)]) == 0
    assert "**Table 1**" in (tmp_path / "tables.md").read_text()


@pytest.mark.tables
def test_every_self_training_run_starts_from_its_base_run_with_the_same_model_flags():
    for name, (flags, base) in evaluate.EXPERIMENTS.items():
        assert (base is not None) == ("--self-training" in flags), name
        if base:
            assert flags[:len(evaluate.EXPERIMENTS[base][0])] == evaluate.EXPERIMENTS[base][0], name


def test_latent_sim_without_a_sim_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--sim", "none", "--latent", "sim"])
    assert exit_info.value.code == 2 and "--latent noise" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_runs_every_baseline_and_fills_every_table(tmp_path):
    tiny = ["--num-train", "8", "--num-test", "2", "--crop-size", "32", "--test-sizes", "32", "48",
            "--batch-size", "4", "--feat-dim", "16", "--pe-dim", "8", "--heads", "2", "--hidden", "16",
            "--small-width", "8", "--iters", "2", "--transfer-iters", "2", "--self-training-iters", "2",
            "--device", "cpu"]
    assert evaluate.main(["--reproduce", str(tmp_path), "--seeds", "0", "--", *tiny]) == 0
    runs = evaluate.collect_runs(tmp_path)
    assert set(runs) == set(evaluate.EXPERIMENTS)
    for name, (flags, _) in evaluate.EXPERIMENTS.items():
        config = json.loads((tmp_path / name / "seed0" / "config.json").read_text())
        for flag, value in zip(flags[::2], flags[1::2]):  # every flag reached train.py
            assert same(config[flag[2:].replace("-", "_")], value), (name, flag)
        assert evaluate.final_stage(name) in runs[name][0]
    assert json.loads((tmp_path / "zs3net" / "seed0" / "config.json").read_text())["latent"] == "noise"
    assert json.loads((tmp_path / "sign" / "seed0" / "config.json").read_text())["latent"] == "sim"
    tables = (tmp_path / "tables.md").read_text()
    assert "–" not in tables and "nan" not in tables  # every cell and bar has its runs
    # a second call finds every run finished and retrains nothing
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed0/metrics.json")}
    assert evaluate.main(["--reproduce", str(tmp_path), "--seeds", "0", "--", *tiny]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed0/metrics.json")}
