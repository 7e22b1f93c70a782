"""Specification of zero-shot for the user's own classes and images (marker ``slow``): a stage 1
that knows no unseen name (``train.py --seen-only``), classes added by name after training
(``--add-classes``: M and C grow, E / SIM / G stay bit for bit, the Transfer Learning Step
re-fits C), and predictions on image files (``evaluate.py --image``)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train
from test_data import make_voc, write_vec, write_word2vec

pytestmark = pytest.mark.slow

TINY = ["--num-train", "8", "--num-test", "2", "--crop-size", "32", "--test-sizes", "32", "--batch-size", "4",
        "--feat-dim", "16", "--pe-dim", "8", "--heads", "2", "--hidden", "16", "--small-width", "8",
        "--iters", "2", "--transfer-iters", "3", "--self-training", "none", "--device", "cpu", "--quiet"]
FROZEN = ("E.", "SIM.", "G.", "D.")  # what the Transfer Learning Step must leave alone


@pytest.fixture(scope="module")
def seen_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("seen_only")
    assert train.main(TINY + ["--seen-only", "--out", str(out)]) == 0
    return out


def test_a_seen_only_stage_1_knows_no_unseen_name_vector_or_output(seen_only):
    ckpt = train.read_checkpoint(seen_only / "checkpoint_train.pt")
    names = data.Shapes("train", size=32, num_images=1).class_names
    assert ckpt["class_names"] == names[:16] and not set(data.SHAPES_UNSEEN) & set(ckpt["class_names"])
    assert ckpt["model"]["M.table"].shape == (17, 600) and ckpt["model"]["C.weight"].shape[0] == 16
    unseen = data.shapes_embeddings(data.SHAPES_UNSEEN)  # (4, 600)
    assert not any(torch.allclose(row, u) for row in ckpt["model"]["M.table"] for u in unseen)
    assert json.loads((seen_only / "metrics.json").read_text()).keys() == {"train"}  # stage 1 alone
    assert not (seen_only / "checkpoint_transfer.pt").exists()


def test_adding_the_unseen_names_grows_m_and_c_and_refits_c_alone(seen_only, tmp_path, capsys):
    old = train.read_checkpoint(seen_only / "checkpoint_train.pt")
    new_path = tmp_path / "added.pt"
    assert train.main(["--add-classes", *data.SHAPES_UNSEEN, "--init-from", str(seen_only / "checkpoint_train.pt"),
                       "--save-as", str(new_path)]) == 0
    new = train.read_checkpoint(new_path)
    assert new["class_names"] == old["class_names"] + data.SHAPES_UNSEEN and new["config"]["num_classes"] == 20
    table = new["model"]["M.table"]
    assert torch.equal(table[:16], old["model"]["M.table"][:16]) and not table[20].any()  # 255's row stays 0
    torch.testing.assert_close(table[16:20], data.shapes_embeddings(data.SHAPES_UNSEEN), rtol=0, atol=0)
    for key, value in old["model"].items():
        if key.startswith(FROZEN):
            assert torch.equal(new["model"][key], value), key
    assert not torch.equal(new["model"]["C.weight"][:16], old["model"]["C.weight"])  # Eq. (10) trains all of C
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(new_path)]) == 0  # scored like any checkpoint, the 4 as unseen
    out = capsys.readouterr().out
    assert "red triangle     unseen" in out and "/4)  harmonic" in out  # 4 unseen classes scored


def test_an_added_class_the_dataset_lacks_or_holds_elsewhere_is_scored_by_name(seen_only, tmp_path, capsys):
    path = tmp_path / "one.pt"
    assert train.main(["--add-classes", "blue circle", "--init-from", str(seen_only / "checkpoint_train.pt"),
                       "--save-as", str(path)]) == 0
    names, label_map = evaluate.scored_classes(train.read_checkpoint(path)["class_names"],
                                               data.Shapes("test", size=32, num_images=1).class_names, 16)
    assert names[16:] == ["blue circle", "red triangle", "green cross", "yellow square"]
    assert label_map[18] == 16 and label_map[16] == 17 and label_map[255] == 255  # the dataset's blue circle is 18


@pytest.mark.cli
@pytest.mark.parametrize("names, says", [
    (["purple circle"], "'purple'"), (["Sky"], "already"), (["red-circle"], "already"), ([], "one class name"),
    (["red triangle", "Red Triangle"], "given twice"), (["red triangle", "red_triangle"], "given twice"),
    ([""], "holds no word"), (["   "], "holds no word"), (["mid-stage"], "not at the end of a stage"),
    (["exists"], "it exists"), (["folder"], "it exists"), (["missing folder"], "is not one")])
def test_a_name_or_checkpoint_that_cannot_be_added_to_is_one_line(names, says, seen_only, tmp_path, capsys):
    """Names compare in lower case with '_' and '-' read as spaces; --init-from's rule for the checkpoint."""
    checkpoint = seen_only / "checkpoint_train.pt"
    if names == ["mid-stage"]:  # as a --save-every checkpoint: stage 1 stopped at iteration 1
        torch.save({**torch.load(checkpoint, weights_only=False), "iteration": 1}, tmp_path / "mid.pt")
        names, checkpoint = ["purple"], tmp_path / "mid.pt"
    save_as = {"exists": checkpoint, "folder": tmp_path, "missing folder": tmp_path / "no" / "x.pt"}.get(
        names[0] if names else "", tmp_path / "x.pt")  # --save-as must not replace a file, least of all its source
    before = checkpoint.read_bytes()
    assert train.main(["--add-classes", *(["purple"] if str(save_as) != str(tmp_path / "x.pt") else names),
                       "--init-from", str(checkpoint), "--save-as", str(save_as)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and not (tmp_path / "x.pt").exists()
    assert checkpoint.read_bytes() == before


def test_real_data_classes_are_added_from_the_word_vector_files_by_the_training_rules(tmp_path, capsys):
    words = sorted({w for n in data.VOC_CLASSES for w in n.split()} | {"zebra"})
    rng = np.random.default_rng(0)
    write_word2vec(tmp_path / "w.bin", {w: rng.normal(size=300) for w in words}, newline=True)
    write_vec(tmp_path / "f.vec", {w.capitalize(): rng.normal(size=300) for w in words})  # the case fallback
    make_voc(tmp_path / "data")
    run = tmp_path / "run"
    assert train.main(["--dataset", "voc", "--data-root", str(tmp_path / "data"), "--embeddings",
                       str(tmp_path / "w.bin"), str(tmp_path / "f.vec"), "--backbone", "resnet18", "--no-pretrained",
                       "--feat-dim", "16", "--pe-dim", "8", "--heads", "2", "--hidden", "16", "--batch-size", "2",
                       "--crop-size", "32", "--iters", "1", "--transfer-iters", "2", "--self-training", "none",
                       "--workers", "0", "--device", "cpu", "--quiet", "--out", str(run)]) == 0
    old = train.read_checkpoint(run / "checkpoint_transfer.pt")
    assert train.main(["--add-classes", "zebra", "--init-from", str(run / "checkpoint_transfer.pt"),
                       "--save-as", str(tmp_path / "z.pt")]) == 0  # the run's own --embeddings
    new = train.read_checkpoint(tmp_path / "z.pt")
    expected = data.load_class_embeddings([tmp_path / "w.bin", tmp_path / "f.vec"], ["zebra"], cache=False)
    torch.testing.assert_close(new["model"]["M.table"][20:21], expected, rtol=0, atol=0)
    assert torch.equal(new["model"]["M.table"][:20], old["model"]["M.table"][:20])
    assert all(torch.equal(new["model"][k], v) for k, v in old["model"].items() if k.startswith(FROZEN))
    assert not torch.equal(new["model"]["C.weight"][20], torch.zeros_like(new["model"]["C.weight"][20]))
    capsys.readouterr()
    assert train.main(["--add-classes", "okapi", "--init-from", str(run / "checkpoint_transfer.pt"),
                       "--save-as", str(tmp_path / "o.pt")]) == 2
    assert "'okapi'" in capsys.readouterr().err


def test_predicting_on_png_and_jpeg_files_writes_the_overlay_and_the_class_shares(seen_only, tmp_path, capsys):
    ds = data.Shapes("test", size=40, num_images=2)
    Image.fromarray(ds.images[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    Image.fromarray(ds.images[1].permute(1, 2, 0).numpy()).save(tmp_path / "b.jpg", quality=90)
    out = tmp_path / "pred"
    assert evaluate.main(["--checkpoint", str(seen_only / "checkpoint_train.pt"), "--image", str(tmp_path / "a.png"),
                          str(tmp_path / "b.jpg"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [p.split(":")[0] for p in printed] == [str(out / "a.png"), str(out / "b.png")]
    shares = [float(v.split()[-2]) for v in printed[0].split(": ", 1)[1].split(", ")]
    assert sum(shares) == pytest.approx(100, abs=0.1 * len(shares))  # rounded to 0.1 %
    picture = np.asarray(Image.open(out / "a.png"))
    assert picture.shape[0] >= 40 and picture.shape[1] > 2 * 40  # image | overlay | legend
    model, ckpt = evaluate.load_checkpoint(seen_only / "checkpoint_train.pt", "cpu")
    (path, got, _), = evaluate.predict_images(model, [tmp_path / "a.png"], tmp_path / "again", class_names=ckpt[
        "class_names"], num_seen=16, mean=data.Shapes.mean, std=data.Shapes.std, device="cpu")
    x = torch.stack([ds[0][0]])  # the benchmark's own normalisation of the same pixels
    pred = model(x).argmax(1)[0]
    assert got == {ckpt["class_names"][c]: 100 * int((pred == c).sum()) / pred.numel() for c in pred.unique()}


def test_seen_only_then_adding_the_unseen_names_is_the_built_in_transfer_step_bit_for_bit(tmp_path):
    """With no stage-1 iteration to tell them apart: the seen-only run starts from the full run's
    weights, and --add-classes draws the rows of C and the batches the built-in transfer step uses."""
    flags = TINY + ["--iters", "0"]  # the later flag wins
    assert train.main(flags + ["--out", str(tmp_path / "full")]) == 0
    assert train.main(flags + ["--out", str(tmp_path / "so"), "--seen-only"]) == 0
    full, so = (train.read_checkpoint(tmp_path / d / "checkpoint_train.pt")["model"] for d in ("full", "so"))
    for key, value in so.items():
        want = full[key][:16] if key.startswith("C.") else full[key]
        assert torch.equal(value, torch.cat([want[:16], want[20:]]) if key == "M.table" else want), key
    assert train.main(["--add-classes", *data.SHAPES_UNSEEN, "--init-from",
                       str(tmp_path / "so" / "checkpoint_train.pt"), "--save-as", str(tmp_path / "added.pt")]) == 0
    built, added = (train.read_checkpoint(p)["model"] for p in (tmp_path / "full" / "checkpoint_transfer.pt",
                                                                 tmp_path / "added.pt"))
    assert built.keys() == added.keys() and all(torch.equal(built[k], added[k]) for k in built)


def test_shapes_refuses_word_vector_files_for_added_classes(seen_only, tmp_path, capsys):
    (tmp_path / "w.vec").write_text("1 2\nsky 0.1 0.2\n")
    assert train.main(["--add-classes", "red triangle", "--init-from", str(seen_only / "checkpoint_train.pt"),
                       "--embeddings", str(tmp_path / "w.vec"), "--save-as", str(tmp_path / "x.pt")]) == 2
    assert "own seeded word vectors" in capsys.readouterr().err
