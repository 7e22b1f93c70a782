"""Specification of evaluate.py's CLI side: test sets, checkpoints, prediction panels and ``main``.

Marker ``metrics`` for the tests that build no model, ``slow`` for those that do (a tiny SIGN,
a few seconds each). ``evaluate.test_sets`` is called through the module: imported by name,
pytest would collect it as a test.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import evaluate
from sign import SIGN
from test_data import write_jpeg, write_label

SIZE = 32  # the tiny checkpoint's shapes test size
TINY = dict(encoder="small", feat_dim=16, pe_dim=8, heads=2, hidden=16, small_width=8)


NAMES = data.Shapes("test", size=SIZE, num_images=1).class_names


def tiny_model() -> SIGN:
    torch.manual_seed(0)
    return SIGN(data.shapes_embeddings(NAMES), num_seen=16, **TINY)


def save(model: SIGN, path, class_names=NAMES, **args):
    """A checkpoint in train.py's format: the keys it writes, the settings evaluate.py reads from its args."""
    args = dict(dataset="shapes", data_root="data", test_sizes=[SIZE], eval_res="full", num_test=4, batch_size=4,
                workers=0, crop_size=SIZE, layout="uniform", alpha=100.0) | args
    torch.save({"model": model.state_dict(), "config": model.config, "args": args, "stage": "transfer",
                "iteration": 3, "metrics": {}, "class_names": class_names, "optimizers": {}, "scaler": {},
                "rng": torch.get_rng_state()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint for a tiny, untrained shapes model."""
    model = tiny_model()
    return save(model, tmp_path_factory.mktemp("run") / "checkpoint_transfer.pt"), model


# ----------------------------------------------------------------------------- no model (metrics)
@pytest.mark.metrics
def test_shapes_test_sets_are_keyed_by_render_size():
    sets = evaluate.test_sets("shapes", sizes=[16, 24], num_images=2)
    assert list(sets) == ["16", "24"]
    assert [tuple(s[0][0].shape) for s in sets.values()] == [(3, 16, 16), (3, 24, 24)]
    assert list(evaluate.test_sets("shapes", num_images=1)) == ["64", "128"]


@pytest.mark.metrics
def test_shapes_test_sets_take_one_count_per_size_a_layout_and_an_independent_scene_seed():
    sets = evaluate.test_sets("shapes", sizes=[16, 24], num_images=[3, 2], layout="uniform", seed=5)
    assert [len(s) for s in sets.values()] == [3, 2] and all(s.layout == "uniform" for s in sets.values())
    np.testing.assert_array_equal(sets["16"].scenes["horizon"],
                                  data.Shapes("test", size=16, num_images=3, seed=5).scenes["horizon"])
    assert not np.array_equal(sets["16"].scenes["horizon"], evaluate.test_sets("shapes", sizes=[16], num_images=3)
                              ["16"].scenes["horizon"])  # seed 0, the benchmark's own test set, differs
    with pytest.raises(ValueError, match="3 test-image counts"):
        evaluate.test_sets("shapes", sizes=[16, 24], num_images=[3, 2, 1])


@pytest.mark.metrics
@pytest.mark.parametrize("name", ["voc", "context", "cocostuff"])
def test_a_real_test_set_with_a_missing_root_raises_dataset_error(name, tmp_path):
    with pytest.raises(data.DatasetError, match="Expected layout"):
        evaluate.test_sets(name, root=tmp_path / "missing")


@pytest.mark.metrics
def test_a_real_test_set_takes_one_size_and_a_known_resolution(tmp_path):
    with pytest.raises(ValueError, match="one size"):
        evaluate.test_sets("voc", root=tmp_path, sizes=[321, 513], eval_res="feature")
    with pytest.raises(ValueError, match="eval_res"):
        evaluate.test_sets("voc", root=tmp_path, eval_res="half")


@pytest.mark.metrics
def test_the_default_palette_is_the_voc_colour_map_shifted_past_black():
    colours = data.label_colours(182)[:182]
    assert colours.dtype == np.uint8 and colours.shape == (182, 3)
    assert colours[:3].tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0]]  # VOC's classes 1-3
    assert len({tuple(c) for c in colours}) == 182 and colours.any(1).all()  # distinct, none black


@pytest.mark.metrics
def test_a_missing_checkpoint_returns_2_with_a_message_naming_the_file(tmp_path, capsys):
    path = tmp_path / "nowhere.pt"
    assert evaluate.main(["--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- a tiny model (slow)
@pytest.mark.slow
def test_load_checkpoint_rebuilds_a_model_with_identical_logits(checkpoint):
    path, model = checkpoint
    loaded, ckpt = evaluate.load_checkpoint(path, "cpu")
    assert not loaded.training and ckpt["stage"] == "transfer"
    torch.testing.assert_close(loaded.M.table, model.M.table, rtol=0, atol=0)  # M came from the state_dict
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.slow
def test_evaluate_sets_prints_a_table_per_set_and_returns_percentages(checkpoint, capsys):
    model, _ = evaluate.load_checkpoint(checkpoint[0], "cpu")
    sets = evaluate.test_sets("shapes", sizes=[SIZE, 40], num_images=3)
    names = sets[str(SIZE)].class_names
    metrics = evaluate.evaluate_sets(model, sets, class_names=names, num_seen=16, device="cpu", batch_size=2,
                                     quiet=True, title="transfer")
    out = capsys.readouterr().out
    assert f"[transfer] test set {SIZE}" in out and "[transfer] test set 40" in out
    assert list(metrics) == [str(SIZE), "40"]
    for m in metrics.values():
        assert all(0.0 <= m[k] <= 100.0 for k in ("seen_miou", "unseen_miou", "harmonic_miou"))
        assert m["per_class"] and set(m["per_class"]) <= set(names)
        assert all(0.0 <= v <= 100.0 for v in m["per_class"].values())


@pytest.mark.slow
def test_main_prints_the_summary_and_writes_prediction_panels(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "panels"
    assert evaluate.main(["--checkpoint", str(path), "--device", "cpu", "--save-predictions", "2",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"test set {SIZE}" in printed and all(w in printed for w in ("seen", "unseen", "harmonic"))
    pngs = sorted(out.rglob("*.png"))
    assert [p.relative_to(out).as_posix() for p in pngs] == [f"{SIZE}/0000.png", f"{SIZE}/0001.png"]
    tile = SIZE * -(-evaluate.MIN_TILE // SIZE)  # small images are upscaled by an integer factor
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.width == 3 * (tile + evaluate.GAP) + evaluate.GAP + evaluate.LEGEND_W
            assert im.height >= evaluate.ROW + tile


@pytest.mark.slow
def test_panels_show_image_labels_in_class_colours_and_a_legend_marking_unseen_classes(checkpoint, tmp_path,
                                                                                      monkeypatch):
    model, _ = evaluate.load_checkpoint(checkpoint[0], "cpu")
    with torch.no_grad():  # predict seen classes only, so unseen ones reach the legend through the GT alone
        model.C.bias[model.num_seen:] = -1e4
    shapes = data.Shapes("test", size=SIZE, num_images=4)  # GT holds unseen classes 18 and 16 in images 2, 3
    palette = np.zeros((20, 3), np.uint8)
    palette[:, 1] = 10 + 12 * np.arange(20)  # distinct greens: no class is black (ignore) or red (unseen text)
    texts = []  # every string drawn, in order, so the legend can be read back
    draw_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: (texts.append(t),
                                                                                   draw_text(self, xy, t, *a, **k)))
    paths = evaluate.save_panels(model, shapes, tmp_path, 4, class_names=shapes.class_names, num_seen=16,
                                 device="cpu", palette=palette)
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    f, T, G, marked = evaluate.MIN_TILE // SIZE, SIZE * evaluate.MIN_TILE // SIZE, evaluate.GAP, set()
    for i, path in enumerate(paths):
        image, label = shapes[i]
        pred = model(image[None]).argmax(1)[0]
        panel = np.asarray(Image.open(path)).astype(int)
        # One pixel per label: the tiles are upscaled f times (nearest) below a ROW-high title strip.
        tile = [panel[evaluate.ROW:evaluate.ROW + T:f, G + j * (T + G):G + j * (T + G) + T:f] for j in range(3)]
        assert np.abs(tile[0] - shapes.images[i].permute(1, 2, 0).numpy()).max() <= 1  # de-normalised
        assert (tile[1] == np.where(label[..., None] == 255, 0, palette[label.clamp(max=19)])).all()
        assert (tile[2] == palette[pred]).all()
        present = sorted(set(label[label != 255].tolist()) | set(pred.unique().tolist()))
        start = texts.index("classes (GT or prediction)") + 1  # this panel's legend header
        legend, texts = texts[start:start + len(present)], texts[start + len(present):]
        assert legend == [shapes.class_names[c] + " (unseen)" * (c >= 16) for c in present]
        r, g, b = panel[:, 3 * (T + G) + G:].transpose(2, 0, 1)  # the legend's channels
        red = bool(((r > 120) & (g < 90) & (b < 90)).any())
        assert red == any(c >= 16 for c in present)
        marked.add(red)
    assert marked == {True, False}  # the panels exercise both cases


@pytest.mark.slow
def test_a_checkpoint_whose_split_differs_from_the_dataset_returns_2(tmp_path, capsys):
    torch.manual_seed(0)
    model = SIGN(torch.randn(20, 8), num_seen=15, **TINY)  # 20 classes like shapes, but 15 seen
    path = save(model, tmp_path / "checkpoint_train.pt", num_test=2)
    assert evaluate.main(["--checkpoint", str(path), "--device", "cpu"]) == 2
    assert "20 classes (15 seen) but shapes has 20 (16 seen)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what z carries (slow)
@pytest.mark.slow
def test_latent_statistics_tell_a_z_at_the_prior_from_a_z_that_carries_the_features():
    shapes = data.Shapes("train", size=SIZE, num_images=24)
    model = tiny_model()
    heads = model.SIM.reparameterize
    for p in heads.parameters():  # mu = 0, log sigma^2 = 0: z is N(0, 1), whatever the pixel
        torch.nn.init.zeros_(p)
    prior = evaluate.latent_statistics(model, shapes, num_images=24)
    assert prior["mu2"] == 0 and prior["sigma2"] == pytest.approx(1) and prior["snr_max"] == 0
    assert abs(prior["probe_z"] - prior["probe_noise"]) < 3  # both at chance, 1/16 of the seen classes
    with torch.no_grad():  # mu = the features themselves, sigma = e^-5: z is a nearly exact copy
        heads.mu.weight.copy_(torch.eye(16)[..., None, None])
        heads.logvar.bias.fill_(-10.0)
    informed = evaluate.latent_statistics(model, shapes, num_images=24)
    # An untrained encoder's features name a class only by its colour, so the probe gains a few points
    assert informed["snr_median"] > 100 and informed["probe_z"] > informed["probe_noise"] + 4


@pytest.mark.slow
def test_the_latent_stats_cli_prints_one_line_for_a_checkpoint(checkpoint, capsys):
    path, _ = checkpoint
    assert evaluate.main(["--checkpoint", str(path), "--latent-stats", "8"]) == 0
    out = capsys.readouterr().out
    assert "mean mu^2" in out and "SNR var(mu)/E[sigma^2]" in out and "from N(0, 1) noise" in out


@pytest.mark.slow
def test_main_scores_an_independently_drawn_test_set_of_the_size_asked_for(checkpoint, monkeypatch, capsys):
    path, _ = checkpoint
    drawn = []
    real_test_sets = evaluate.test_sets
    monkeypatch.setattr(evaluate, "test_sets", lambda *a, **kw: drawn.append(kw) or real_test_sets(*a, **kw))
    assert evaluate.main(["--checkpoint", str(path), "--device", "cpu", "--test-seed", "7", "--num-test", "3"]) == 0
    assert (drawn[0]["seed"], drawn[0]["num_images"], drawn[0]["layout"]) == (7, [3], "uniform")  # the checkpoint's
    assert f"test set {SIZE}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad or hostile input (cli)
def one_line_error(capsys, *named: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert all(text in err for text in named), (named, err)
    return err


def picture(path, size=(40, 30)):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.cli
@pytest.mark.parametrize("where", ["below a file", "in /proc", "/proc itself"])
@pytest.mark.parametrize("what", ["--image", "--save-predictions"])
def test_an_out_folder_that_cannot_be_written_is_one_line_naming_it(where, what, checkpoint, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    if "proc" in where and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where not even root can write")
    out = {"below a file": tmp_path / "file.txt" / "sub", "in /proc": Path("/proc/sign-panels"),
           "/proc itself": Path("/proc")}[where]
    flags = ["--image", str(picture(tmp_path / "a.png"))] if what == "--image" else ["--save-predictions", "1"]
    assert evaluate.main(["--checkpoint", str(checkpoint[0]), "--device", "cpu", *flags, "--out", str(out)]) == 2
    one_line_error(capsys, f"--out {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "file.txt"][what != "--image":]


@pytest.mark.cli
@pytest.mark.parametrize("side, mode", [(14000, "1"), (10000, "1")])  # over twice PIL's bound, and over it
def test_an_image_over_the_decompression_bomb_bound_is_refused_in_one_line(side, mode, checkpoint, tmp_path, capsys):
    Image.new(mode, (side, side)).save(tmp_path / "bomb.png")
    assert evaluate.main(["--checkpoint", str(checkpoint[0]), "--image", str(tmp_path / "bomb.png"),
                          "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, f"--image {tmp_path / 'bomb.png'}", "decompression bomb")
    assert not (tmp_path / "out").exists() and Image.MAX_IMAGE_PIXELS == 89478485  # PIL's, untouched


@pytest.mark.cli
@pytest.mark.parametrize("max_side, predicted", [("48", "48×32"), ("0", None), ("300", None)])
def test_max_side_predicts_a_large_image_smaller_and_draws_it_at_its_own_size(max_side, predicted, checkpoint,
                                                                              tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(checkpoint[0]), "--image", str(picture(tmp_path / "a.png", (300, 200))),
                          "--out", str(tmp_path / "out"), "--max-side", max_side]) == 0
    line = capsys.readouterr().out.strip()
    note = f" (predicted at {predicted}, resized from 300×200)" if predicted else ""
    assert line.startswith(f"{tmp_path / 'out' / 'a.png'}{note}: ")
    with Image.open(tmp_path / "out" / "a.png") as im:  # image | overlay at 300 x 200, then the legend
        assert im.width == 2 * (300 + evaluate.GAP) + evaluate.GAP + evaluate.LEGEND_W and im.height >= 200


@pytest.mark.cli
def test_a_prediction_that_runs_out_of_memory_is_one_line_naming_the_image_and_max_side(checkpoint, tmp_path, capsys,
                                                                                     monkeypatch):
    def out_of_memory(self, x):  # what the CPU allocator raises for attention over a 6000 x 6000 image
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 81000000000000 bytes")
    monkeypatch.setattr(SIGN, "forward", out_of_memory)
    path = picture(tmp_path / "a.png")
    assert evaluate.main(["--checkpoint", str(checkpoint[0]), "--image", str(path), "--max-side", "0",
                          "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, f"--image {path}: predicting at 40×30", "can't allocate memory", "--max-side")


def exif_rotated(path):  # 40 wide, 20 high on disk, left half red; orientation 6: shown rotated 90° clockwise
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, quality=95, exif=exif)


IMAGE_MODES = {  # how a file is written, then the (H, W, 3) uint8 it must read as
    "16-bit PNG": (lambda p: Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(p.with_suffix(".png")),
                   np.array([[0, 128, 255]])),
    "float TIFF in [0, 1]": (lambda p: Image.fromarray(np.array([[0, .5, 1]], np.float32)).save(p.with_suffix(".tif")),
                             np.array([[0, 128, 255]])),
    "float TIFF, other range": (lambda p: Image.fromarray(np.array([[-2, 0, 2]], np.float32)).save(
        p.with_suffix(".tif")), np.array([[0, 128, 255]])),
    "EXIF orientation": (lambda p: exif_rotated(p.with_suffix(".jpg")), None),
}


@pytest.mark.cli
@pytest.mark.parametrize("kind", IMAGE_MODES)
def test_image_modes_are_scaled_to_0_255_and_turned_upright(kind, tmp_path):
    write, expected = IMAGE_MODES[kind]
    write(tmp_path / "x")
    image = evaluate.read_image(next(tmp_path.iterdir())).permute(1, 2, 0).numpy().astype(int)  # (H, W, 3)
    if expected is not None:
        assert (image == expected[..., None]).all(), image[..., 0]
    else:  # upright: 20 wide, 40 high, red on top
        assert image.shape == (40, 20, 3) and image[:15, :, 0].min() > 200 and image[25:, :, 0].max() < 50


@pytest.mark.cli
def test_a_float_image_with_nan_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    Image.fromarray(np.array([[np.nan, 1]], np.float32)).save(tmp_path / "nan.tif")
    assert evaluate.main(["--checkpoint", str(checkpoint[0]), "--image", str(tmp_path / "nan.tif")]) == 2
    one_line_error(capsys, f"--image {tmp_path / 'nan.tif'}", "NaN")


@pytest.mark.cli
@pytest.mark.parametrize("w, h", [(1, 1), (2, 300)])
def test_a_tiny_or_narrow_image_gives_a_legible_panel(w, h, checkpoint, tmp_path):
    Image.new("RGB", (w, h), "red").save(tmp_path / "dot.png")
    assert evaluate.main(["--checkpoint", str(checkpoint[0]), "--image", str(tmp_path / "dot.png"),
                          "--out", str(tmp_path / "out")]) == 0
    panel = np.asarray(Image.open(tmp_path / "out" / "dot.png"))
    T, G, f = evaluate.MIN_TILE, evaluate.GAP, -(-evaluate.MIN_TILE // max(w, h))  # tiny: upscaled f times
    assert panel.shape[:2] == (evaluate.ROW + max(f * h, T) + G, 2 * (T + G) + G + evaluate.LEGEND_W)  # titles T apart
    assert (panel[evaluate.ROW:evaluate.ROW + f * h, G:G + f * w] == [255, 0, 0]).all()


@pytest.mark.cli
def test_images_of_one_name_get_distinct_pictures_and_no_input_is_overwritten(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    paths = [picture(d / "same.png") for d in (tmp_path / "d1", tmp_path / "d2", out) if d.mkdir() is None]
    before = out.joinpath("same.png").read_bytes()
    assert evaluate.main(["--checkpoint", str(checkpoint[0]), "--image", *map(str, paths),
                          str(picture(tmp_path / "SAME.jpg")), "--out", str(out)]) == 0
    written = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert written == [str(out / f"same-{k}.png") for k in (2, 3, 4)] + [str(out / "SAME-5.png")]
    assert out.joinpath("same.png").read_bytes() == before  # the input in --out is left as it was


@pytest.mark.cli
def test_latent_stats_on_a_training_set_smaller_than_asked_says_how_many_it_used(tmp_path, capsys):
    top = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for name in "abc":  # three training images, aeroplane (seen) on the left, bird on the right
        write_jpeg(top / "JPEGImages" / f"{name}.jpg", 32, 32)
        write_label(top / "SegmentationClassAug" / f"{name}.png", np.repeat([[1] * 16 + [3] * 16], 32, 0))
    (top / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train_aug", "val"):
        (top / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("a\nb\nc\n")
    names = data.build_dataset("voc", "test", root=tmp_path / "voc").class_names
    torch.manual_seed(0)
    path = save(SIGN(torch.randn(20, 8), num_seen=15, **TINY), tmp_path / "voc.pt", class_names=names,
                dataset="voc", data_root=str(tmp_path / "voc"), test_sizes=[513], num_test=None)
    assert evaluate.main(["--checkpoint", str(path), "--device", "cpu", "--latent-stats"]) == 0
    assert " of 3 voc training images" in capsys.readouterr().out
