"""Specification of the command lines' failure modes (marker ``cli``): every bad input is one
line on stderr naming the flag or file, exit 2, before any work; interruptions and faults
lose no finished stage; ``--resume`` writes where it is told. Runs the real ``main``s."""
import errno
import json
import shutil

import numpy as np
import pytest
import torch

import data
import evaluate
import train
from test_data import VOC_RAW, make_voc, tile, write_jpeg, write_label

pytestmark = pytest.mark.cli

TINY = ["--num-train", "8", "--num-test", "2", "--crop-size", "32", "--test-sizes", "32", "--batch-size", "4",
        "--feat-dim", "16", "--pe-dim", "8", "--heads", "2", "--hidden", "16", "--small-width", "8",
        "--iters", "3", "--transfer-iters", "2", "--self-training", "none", "--device", "cpu", "--quiet",
        "--log-every", "1"]


def one_line_error(capsys, *named: str) -> str:
    """stderr's error: a single line, no traceback, holding every string in ``named``."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for text in named:
        assert text in err, (text, err)
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Building the data means the flags were accepted: fail loudly if that happens."""
    def refuse(args):
        raise AssertionError("the data was built: the bad flag was not caught at startup")
    monkeypatch.setattr(train, "build_data", refuse)


BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size"), (["--log-every", "0"], "--log-every"),
    (["--iters", "-1"], "--iters"), (["--transfer-iters", "-2"], "--transfer-iters"),
    (["--self-training-iters", "-1"], "--self-training-iters"),
    (["--unseen-rate", "1.5"], "--unseen-rate"), (["--unseen-rate", "-0.1"], "--unseen-rate"),
    (["--keep", "0"], "--keep"), (["--keep", "1.5"], "--keep"),
    (["--temperature", "0"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--save-every", "-1"], "--save-every"),
    (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"), (["--lr-transfer", "inf"], "--lr-transfer"),
    (["--lr-g", "-1"], "--lr-g"), (["--lr-d", "0"], "--lr-d"), (["--lr-mult", "nan"], "--lr-mult"),
    (["--alpha", "nan"], "--alpha"), (["--beta", "-1"], "--beta"), (["--mmd-sigmas", "1", "0"], "--mmd-sigmas"),
    (["--workers", "-1"], "--workers"), (["--pe-dim", "6"], "--pe-dim"), (["--heads", "5"], "--heads"),
    (["--mmd-pixels", "0"], "--mmd-pixels"), (["--small-width", "12"], "--small-width"),
    (["--dataset", "voc", "--small-context", "local"], "--small-context"),
    (["--crop-size", "7"], "--crop-size"), (["--test-sizes", "64", "7"], "--test-sizes"),
    (["--num-train", "3"], "--num-train"), (["--num-test", "0"], "--num-test"),
    (["--num-test", "1", "2", "3"], "--num-test"), (["--sim", "none", "--latent", "sim"], "--latent"),
    (["--device", "nonsense"], "--device"), (["--embeddings", "nowhere.vec"], "--embeddings"),
    (["--dataset", "voc", "--embeddings", "nowhere.bin"], "nowhere.bin"),
]


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_exit_2_before_any_work(flags, named, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    assert train.main(flags + ["--out", str(out), "--quiet"]) == 2
    one_line_error(capsys, named)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_at_startup(tmp_path, capsys, no_work):
    assert train.main(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "--device cuda", "--device cpu")
    assert evaluate.main(["--checkpoint", str(tmp_path / "x.pt"), "--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda")


def test_an_out_that_is_a_file_or_under_a_file_or_an_existing_run_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert train.main(["--out", str(out)]) == 2
        one_line_error(capsys, str(out))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint_train.pt").write_bytes(b"")
    assert train.main(["--out", str(tmp_path / "done")]) == 2
    one_line_error(capsys, "--resume", "checkpoint_train.pt")


# ----------------------------------------------------------------------------- checkpoint files
def bad_checkpoints(root, good):
    """Files that are not train.py checkpoints, by kind: each must be refused naming itself."""
    root.mkdir(exist_ok=True)
    files = {"text": b"hello, I am a text file\n", "random bytes": np.random.default_rng(0).bytes(4096),
             "truncated": good.read_bytes()[:2000]}
    paths = {}
    for kind, content in files.items():
        paths[kind] = root / f"{kind.replace(' ', '_')}.pt"
        paths[kind].write_bytes(content)
    paths["foreign dict"] = root / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, paths["foreign dict"])
    paths["a folder"] = root / "folder.pt"
    paths["a folder"].mkdir()
    return paths


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["text", "random bytes", "truncated", "foreign dict", "a folder"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it_in_both_clis(kind, finished_run, tmp_path, capsys):
    path = bad_checkpoints(tmp_path / "bad", finished_run / "checkpoint_transfer.pt")[kind]
    assert evaluate.main(["--checkpoint", str(path)]) == 2
    err = one_line_error(capsys, str(path))
    assert "weights_only" not in err and ("not a train.py checkpoint" in err or "is a folder" in err)
    assert train.main(TINY + ["--out", str(tmp_path / "r"), "--init-from", str(path)]) == 2
    one_line_error(capsys, str(path))
    assert not (tmp_path / "r").exists()


def test_init_from_a_mid_stage_checkpoint_is_refused(finished_run, tmp_path, capsys):
    ckpt = train.read_checkpoint(finished_run / "checkpoint_transfer.pt")
    torch.save({**ckpt, "iteration": 1}, tmp_path / "mid.pt")
    assert train.main(TINY + ["--out", str(tmp_path / "r"), "--init-from", str(tmp_path / "mid.pt")]) == 2
    one_line_error(capsys, "iteration 1 of 2", "--resume")


def test_resume_refuses_flags_that_would_change_the_run(finished_run, capsys):
    assert train.main(["--resume", str(finished_run), "--iters", "999", "--lr", "5"]) == 2
    one_line_error(capsys, "--iters", "--lr")
    assert train.main(["--resume", str(finished_run), "--out", "elsewhere"]) == 2
    one_line_error(capsys, "--out")


def test_evaluate_refuses_a_negative_save_predictions(finished_run, capsys):
    assert evaluate.main(["--checkpoint", str(finished_run / "checkpoint_transfer.pt"),
                          "--save-predictions", "-1"]) == 2
    one_line_error(capsys, "--save-predictions")


# ----------------------------------------------------------------------------- nothing finished is lost
def interrupted_run(out, monkeypatch, at: int = 3):
    """A tiny run stopped by Ctrl-C in the transfer step's iteration ``at - 1`` (checkpoints every iteration)."""
    calls, real = {"n": 0}, train.transfer_step

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "transfer_step", step)
    code = train.main(TINY + ["--out", str(out), "--save-every", "1", "--transfer-iters", "4"])
    monkeypatch.setattr(train, "transfer_step", real)
    return code


def test_ctrl_c_is_one_line_naming_the_stage_and_the_resume_command_exit_130(tmp_path, monkeypatch, capsys):
    assert interrupted_run(tmp_path / "run", monkeypatch) == 130
    one_line_error(capsys, "stage transfer, iteration 2", f"--resume {tmp_path / 'run'}")


def test_resume_writes_into_the_folder_it_is_given_not_the_one_recorded(tmp_path, monkeypatch):
    original = tmp_path / "run"
    interrupted_run(original, monkeypatch)
    before = {p.name: p.read_bytes() for p in original.iterdir()}
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert train.main(["--resume", str(copy), "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in original.iterdir()} == before  # untouched
    assert json.loads((copy / "config.json").read_text())["out"] == str(copy)
    assert "transfer" in json.loads((copy / "metrics.json").read_text())


def test_resume_drops_a_half_written_last_log_line_and_falls_back_past_a_corrupt_checkpoint(
        tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    interrupted_run(run, monkeypatch)
    with open(run / "losses.jsonl", "a") as f:
        f.write('{"stage": "transfer", "itera')  # killed while appending
    (run / "checkpoint_transfer.pt").write_bytes(b"\0" * 100)  # killed while... anything
    assert train.main(["--resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint_transfer.pt" in err and "resuming from checkpoint_train.pt" in err and "dropped 1" in err
    lines = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in lines if e["stage"] == "transfer"] == [0, 1, 2, 3]


def test_a_full_disk_removes_the_partial_file_and_names_the_intact_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = torch.save, {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # stage 1's four saves succeed, the transfer step's first fails half-way
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--save-every", "1"]) == 2
    one_line_error(capsys, "no space left", "checkpoint_train.pt", "--resume")
    assert not list(out.glob("*.tmp"))
    assert train.read_checkpoint(out / "checkpoint_train.pt")["iteration"] == 3


def test_a_bad_test_label_found_while_evaluating_keeps_the_stage_and_exits_2(tmp_path, capsys):
    top = make_voc(tmp_path / "data")
    write_jpeg(top / "JPEGImages" / "c.jpg", 6, 8)
    bad = np.asarray(tile(VOC_RAW))
    bad[0, 0] = 77  # no VOC class has id 77
    write_label(top / "SegmentationClassAug" / "c.png", bad)
    (top / "ImageSets/Segmentation/val.txt").write_text("a\nb\nc\n")
    np.save(tmp_path / "t.npy", np.random.default_rng(0).normal(size=(20, 600)).astype(np.float32))
    out = tmp_path / "run"
    code = train.main(["--dataset", "voc", "--data-root", str(tmp_path / "data"), "--embeddings",
                       str(tmp_path / "t.npy"), "--backbone", "resnet18", "--no-pretrained", "--feat-dim", "16",
                       "--pe-dim", "8", "--heads", "2", "--hidden", "16", "--batch-size", "2", "--crop-size", "32",
                       "--iters", "1", "--transfer-iters", "1", "--self-training", "none", "--workers", "1",
                       "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 2
    one_line_error(capsys, "c.png", "[77]", "evaluating after stage train", "--resume")
    assert train.read_checkpoint(out / "checkpoint_train.pt")["iteration"] == 1


def test_data_all_lists_every_bad_file_of_both_splits_and_counts_the_images_of_each_unseen_images_choice(
        tmp_path, capsys):
    top = make_voc(tmp_path)
    assert data.main(["--dataset", "voc", "--data-root", str(tmp_path), "--all"]) == 0
    assert "train: 2 images with --unseen-images ignore, 0 with drop" in capsys.readouterr().out
    (top / "JPEGImages" / "b.jpg").write_bytes((top / "JPEGImages" / "b.jpg").read_bytes()[:40])  # truncated
    write_jpeg(top / "JPEGImages" / "c.jpg", 6, 8)
    write_label(top / "SegmentationClassAug" / "c.png", np.full((6, 8), 77))
    (top / "ImageSets/Segmentation/val.txt").write_text("a\nc\n")
    assert data.main(["--dataset", "voc", "--data-root", str(tmp_path)]) == 0  # item 0 alone is fine
    capsys.readouterr()
    assert data.main(["--dataset", "voc", "--data-root", str(tmp_path), "--all"]) == 1
    err = capsys.readouterr().err
    assert "train item 1" in err and "b.jpg" in err and "test item 1" in err and "c.png" in err
    assert "Traceback" not in err
    write_label(top / "SegmentationClassAug" / "a.png", np.full((5, 8), 0))  # item 0: not the image's size
    assert data.main(["--dataset", "voc", "--data-root", str(tmp_path), "--all"]) == 1
    err = capsys.readouterr().err
    assert "train item 0" in err and "a.png" in err and "train item 1" in err and "test item 1" in err


def voc_word_vectors(path, bad_value: str) -> None:
    """Word vectors in ``path``'s format for every word of VOC's class names; sheep's is all ``bad_value``."""
    from test_data import write_vec, write_word2vec
    words = {w for name in data.VOC_CLASSES for w in name.split()}
    rng, dim = np.random.default_rng(0), 600 if path.suffix == ".npy" else 300
    vectors = {w: np.zeros(dim) if w == "sheep" and bad_value == "0" else rng.normal(size=dim) for w in words}
    vectors["sheep"][:] = float(bad_value)
    if path.suffix == ".npy":
        np.save(path, np.stack([vectors[name.split()[-1]] for name in data.VOC_CLASSES]).astype(np.float32))
    elif path.suffix == ".vec":
        write_vec(path, vectors)
    else:
        write_word2vec(path, vectors, newline=True)


@pytest.mark.parametrize("value", ["nan", "inf", "1e30", "0"])
@pytest.mark.parametrize("suffix", [".npy", ".vec", ".bin"])
def test_word_vectors_with_nan_inf_huge_or_zero_values_are_refused_at_startup_naming_file_and_class(
        suffix, value, tmp_path, capsys, monkeypatch):
    make_voc(tmp_path / "data")
    files = [tmp_path / f"words{suffix}"] + ([tmp_path / "other.vec"] if suffix != ".npy" else [])
    voc_word_vectors(files[0], value)
    if len(files) > 1:
        voc_word_vectors(files[1], "0" if value == "0" else "1")  # a class vector, both halves, is all zero
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    assert train.main(["--dataset", "voc", "--data-root", str(tmp_path / "data"), "--embeddings", *map(str, files),
                       "--out", str(tmp_path / "run"), "--quiet"]) == 2
    one_line_error(capsys, files[0].name, "'sheep'", "expected finite word vectors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", *(f.name for f in files)])  # no cache


def test_amp_on_the_cpu_runs_bfloat16_autocast_close_to_float32_and_config_json_records_it(tmp_path):
    """The CPU test suite runs the autocast path CUDA uses. Tolerance: the first logged losses
    within 2 % (bfloat16 keeps 8 bits of mantissa), the metrics within 5 points."""
    runs = {}
    for name, flags in (("fp32", []), ("amp", ["--amp"])):
        assert train.main(TINY + ["--out", str(tmp_path / name), *flags]) == 0
        runs[name] = [json.loads(line) for line in (tmp_path / name / "losses.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "amp" / "config.json").read_text())["amp_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["amp_dtype"] == "float32"
    for a, b in zip(runs["fp32"], runs["amp"]):
        assert all(np.isfinite(b[k]) for k in b if k not in ("stage", "iteration"))
    assert runs["amp"] != runs["fp32"]  # autocast ran: bfloat16 rounds the activations
    first = runs["fp32"][0], runs["amp"][0]
    for key in ("sim", "pred", "d", "g"):
        assert first[1][key] == pytest.approx(first[0][key], rel=0.02), key
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text())["transfer"]["32"] for n in ("fp32", "amp")]
    for key in ("seen_miou", "unseen_miou", "harmonic_miou"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], abs=5), key


EVALUATE_FLAGS = [(["--save-predictions", "-1"], "--save-predictions"), (["--size", "0"], "--size"),
                  (["--num-test", "0"], "--num-test"), (["--test-seed", "-1"], "--test-seed"),
                  (["--latent-stats", "0"], "--latent-stats"), (["--device", "nonsense"], "--device")]


@pytest.mark.parametrize("flags, named", EVALUATE_FLAGS, ids=[" ".join(f) for f, _ in EVALUATE_FLAGS])
def test_evaluate_refuses_a_bad_flag_in_one_line(flags, named, finished_run, capsys):
    assert evaluate.main(["--checkpoint", str(finished_run / "checkpoint_transfer.pt"), *flags]) == 2
    one_line_error(capsys, named)


def test_evaluate_refuses_an_out_that_is_a_file(finished_run, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert evaluate.main(["--checkpoint", str(finished_run / "checkpoint_transfer.pt"), "--save-predictions", "1",
                          "--out", str(tmp_path / "f")]) == 2
    one_line_error(capsys, "--out")


DATA_FLAGS = [(["--size", "4"], "--size"), (["--num-samples", "0"], "--num-samples"), (["--seed", "-1"], "--seed"),
              (["--preview", "{tmp}"], "--preview"), (["--preview", "{tmp}/file/x.png"], "--preview")]


@pytest.mark.parametrize("flags, named", DATA_FLAGS, ids=[" ".join(f) for f, _ in DATA_FLAGS])
def test_data_refuses_a_bad_flag_in_one_line(flags, named, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert data.main([f.replace("{tmp}", str(tmp_path)) for f in flags]) == 2
    one_line_error(capsys, named)


def test_reproduce_checks_the_flags_and_its_folder_before_starting_any_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "reproduce", lambda *a, **k: pytest.fail("a run was started"))
    assert train.main(["--reproduce", str(tmp_path / "rep"), "--batch-size", "0"]) == 2
    one_line_error(capsys, "--batch-size")
    (tmp_path / "file").write_text("x")
    assert train.main(["--reproduce", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "--reproduce", "is a file")
    assert train.main(["--reproduce", str(tmp_path / "rep"), "--seeds", "5", "5"]) == 2
    one_line_error(capsys, "--seeds", "[5] given twice")
    assert train.main(["--reproduce", str(tmp_path / "rep"), "--seeds", "-1"]) == 2
    one_line_error(capsys, "--seeds", ">= 0")
    (tmp_path / "rep" / "tables.md").mkdir(parents=True)
    assert train.main(["--reproduce", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, "tables.md", "not a file")


def test_a_corrupt_checkpoint_in_a_reproduction_folder_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """The tables count SIM's parameters from each run's checkpoint_train.pt: a broken one is named, no traceback."""
    monkeypatch.setattr(train, "reproduce", lambda *a, **k: [])
    run = tmp_path / "rep" / "sign" / "seed0"
    run.mkdir(parents=True)
    scores = dict(seen_miou=70.0, unseen_miou=40.0, harmonic_miou=50.9, per_class={"sky": 90.0})
    (run / "metrics.json").write_text(json.dumps({"train": {"64": scores}, "transfer": {"64": scores}}))
    (run / "checkpoint_train.pt").write_bytes(b"not a checkpoint")
    assert train.main(["--reproduce", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, "checkpoint_train.pt", "not a train.py checkpoint")


def test_ctrl_c_in_the_reproduction_runner_is_one_line_naming_the_command_to_continue_exit_130(tmp_path, capsys,
                                                                                              monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "reproduce", interrupted)
    assert train.main(["--reproduce", str(tmp_path / "rep")]) == 130
    one_line_error(capsys, "interrupted", f"--reproduce {tmp_path / 'rep'}")


@pytest.mark.parametrize("kind", ["missing", "folder", "not an image", "truncated"])
def test_an_image_that_cannot_be_read_is_one_line_naming_it(kind, finished_run, tmp_path, capsys):
    path = {"missing": tmp_path / "nowhere.png", "folder": tmp_path, "not an image": tmp_path / "notes.png",
            "truncated": tmp_path / "cut.jpg"}[kind]
    (tmp_path / "notes.png").write_text("not pixels")
    write_jpeg(tmp_path / "full.jpg", 32, 32)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    assert evaluate.main(["--checkpoint", str(finished_run / "checkpoint_transfer.pt"), "--image",
                          str(tmp_path / "full.jpg"), str(path), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "--image", str(path))
    assert not (tmp_path / "out").exists()  # every file is checked before any is predicted


def test_a_second_process_in_a_run_folder_is_refused_while_the_first_writes_to_it(finished_run, tmp_path, capsys):
    """Two runs with one --out, or a --resume of a run still going, would overwrite each other's files."""
    with train.claimed(tmp_path):  # as a run started a moment earlier holds it
        assert train.main(TINY + ["--out", str(tmp_path)]) == 2
        one_line_error(capsys, str(tmp_path), "in use by another train.py process")
        assert not (tmp_path / "config.json").exists()
    before = (finished_run / "losses.jsonl").read_bytes()
    with train.claimed(finished_run):
        assert train.main(["--resume", str(finished_run), "--quiet"]) == 2
        one_line_error(capsys, "in use by another train.py process")
    assert (finished_run / "losses.jsonl").read_bytes() == before
    assert train.main(TINY + ["--out", str(tmp_path)]) == 0  # released


@pytest.mark.parametrize("change", ["config.json edited", "another run's checkpoint", "the same settings, another run"])
def test_resume_refuses_a_folder_whose_files_belong_to_different_runs(change, tmp_path, monkeypatch, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert interrupted_run(run, monkeypatch) == 130  # stopped in the transfer step: checkpoint_transfer.pt
    capsys.readouterr()
    if change == "config.json edited":
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
        named = ["config.json", "lr: 0.003 there, 0.5 in config.json"]
    else:  # a run with other settings, or the same ones: its checkpoints are not this run's either
        assert train.main(TINY + ["--out", str(other), "--save-every", "1", "--transfer-iters", "4"]
                          + (["--sim", "conv"] if change == "another run's checkpoint" else [])) == 0
        shutil.copy(other / "checkpoint_transfer.pt", run / "checkpoint_transfer.pt")
        named = ["checkpoint_transfer.pt", "mixes two runs",
                 "sim: 'conv' there, 'multihead'" if change == "another run's checkpoint" else "run_id"]
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert train.main(["--resume", str(run), "--quiet"]) == 2
    one_line_error(capsys, *named)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # refused before writing anything


def test_a_resumed_init_from_run_keeps_its_teacher_and_takes_a_moved_data_root(finished_run, tmp_path, monkeypatch,
                                                                              capsys):
    """The checkpoint an --init-from run starts from is copied into its folder: deleting the source does not
    change the resumed run. --resume may be given --data-root (no number depends on where the data lies)."""
    source = tmp_path / "source.pt"
    shutil.copy(finished_run / "checkpoint_transfer.pt", source)
    flags = TINY + ["--self-training", "ast", "--self-training-iters", "3", "--init-from", str(source)]
    assert train.main(flags + ["--out", str(tmp_path / "whole")]) == 0
    calls, real = {"n": 0}, train.training_step_sim

    def step(*args, **kwargs):  # Ctrl-C in self-training's second iteration
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "training_step_sim", step)
    assert train.main(flags + ["--out", str(tmp_path / "cut"), "--save-every", "1"]) == 130
    monkeypatch.setattr(train, "training_step_sim", real)
    source.unlink()
    teacher = (tmp_path / "cut" / "checkpoint_transfer.pt").read_bytes()
    shutil.copy(finished_run / "checkpoint_transfer.pt", tmp_path / "cut")  # another run's, as the teacher
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "cut"), "--quiet"]) == 2
    one_line_error(capsys, "checkpoint_transfer.pt belongs to another run")
    (tmp_path / "cut" / "checkpoint_transfer.pt").write_bytes(teacher)
    assert train.main(["--resume", str(tmp_path / "cut"), "--quiet", "--data-root", str(tmp_path / "moved")]) == 0
    for name in ("losses.jsonl", "metrics.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["data_root"] == str(tmp_path / "moved")


def test_a_resume_whose_data_and_word_vectors_moved_names_the_flags_that_give_their_new_paths(tmp_path, capsys):
    from test_train import tiny_voc_run
    run, old, new = tmp_path / "old" / "run", tmp_path / "old", tmp_path / "new"
    assert train.main(tiny_voc_run(old, "--iters", "1", "--transfer-iters", "1", "--self-training", "none",
                                   "--backbone", "small", "--small-width", "8")) == 0
    new.mkdir()
    for name in ("data", "voc_classes.npy"):
        (old / name).rename(new / name)
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--quiet"]) == 2
    one_line_error(capsys, "voc_classes.npy", f"--resume {run} --embeddings FILE")
    assert train.main(["--resume", str(run), "--quiet", "--embeddings", str(new / "voc_classes.npy")]) == 2
    err = capsys.readouterr().err  # the missing layout's message also shows the expected one
    assert str(old / "data") in err and f"--resume {run} --data-root DIR" in err and "Traceback" not in err
    assert train.main(["--resume", str(run), "--quiet", "--embeddings", str(new / "voc_classes.npy"),
                       "--data-root", str(new / "data")]) == 0


@pytest.mark.parametrize("name", ["losses.jsonl", "metrics.json", "config.json"])
def test_a_full_disk_while_logging_is_one_line_naming_the_file(name, tmp_path, monkeypatch, capsys):
    import builtins
    from pathlib import Path
    real_open, real_write = builtins.open, Path.write_text

    def full(path):
        if Path(path).name in (name, name + ".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train, "open", lambda path, *a, **k: full(path) or real_open(path, *a, **k), raising=False)
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: full(self) or real_write(self, *a, **k))
    assert train.main(TINY + ["--out", str(tmp_path)]) == 2
    one_line_error(capsys, str(tmp_path / name), "No space left" if name == "losses.jsonl" else "no space left")
    assert not list(tmp_path.glob("*.tmp"))


def test_a_resume_whose_log_was_deleted_says_so_and_logs_from_its_checkpoint_on(tmp_path, monkeypatch, capsys):
    assert interrupted_run(tmp_path, monkeypatch) == 130
    (tmp_path / "losses.jsonl").unlink()
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path), "--quiet"]) == 0
    assert "losses.jsonl is missing: the log starts again at stage transfer, iteration 2" in capsys.readouterr().err
    assert [json.loads(line)["iteration"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()] == [2, 3]
