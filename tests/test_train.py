"""Specification of train.py: the pipeline runs end to end, is reproducible, resumes exactly,
stops on non-finite losses, and its presets and error messages hold (marker ``slow``)."""
import json
import math

import numpy as np
import pytest
import torch

import train
from sign import SIGN

pytestmark = pytest.mark.slow

TINY = ["--num-train", "16", "--num-test", "4", "--crop-size", "32", "--test-sizes", "32", "48",
        "--batch-size", "4", "--feat-dim", "16", "--pe-dim", "8", "--heads", "2", "--hidden", "16",
        "--small-width", "8", "--iters", "6", "--transfer-iters", "4", "--self-training-iters", "4",
        "--self-training", "ast", "--device", "cpu", "--quiet", "--log-every", "1"]


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


def test_a_tiny_run_writes_finite_losses_metrics_and_checkpoints(tiny_run):
    logged = losses(tiny_run)
    assert {entry["stage"] for entry in logged} == set(train.STAGES)
    assert all(math.isfinite(v) for entry in logged for k, v in entry.items() if k not in ("stage", "iteration"))
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(metrics) == {"train", "transfer", "self_training"}
    for stage in metrics.values():
        assert set(stage) == {"32", "48"}
        for m in stage.values():
            for key in ("seen_miou", "unseen_miou", "harmonic_miou"):
                assert 0.0 <= m[key] <= 100.0
            assert all(0.0 <= v <= 100.0 for v in m["per_class"].values())
    assert json.loads((tiny_run / "config.json").read_text())["sim"] == "multihead"


def test_checkpoints_reload_into_the_same_model(tiny_run):
    for stage in train.STAGES:
        ckpt = train.read_checkpoint(tiny_run / f"checkpoint_{stage}.pt")
        assert ckpt["stage"] == stage and ckpt["iteration"] == ckpt["args"][
            {"train": "iters", "transfer": "transfer_iters", "self_training": "self_training_iters",
             "self_training_transfer": "transfer_iters"}[stage]]
        model = SIGN.from_config(ckpt["config"])
        model.load_state_dict(ckpt["model"])
        x = torch.randn(1, 3, 32, 32)
        assert model.eval()(x).shape == (1, 20, 32, 32)
    assert not list(tiny_run.glob("*.tmp"))


def test_two_runs_with_the_same_seed_log_identical_losses(tiny_run, tmp_path):
    assert train.main(TINY + ["--out", str(tmp_path)]) == 0
    assert losses(tmp_path) == losses(tiny_run)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads((tiny_run / "metrics.json").read_text())


def test_an_interrupted_run_resumed_matches_the_uninterrupted_one(tiny_run, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_step = train.transfer_step

    def interrupted(*args, **kwargs):  # stop in the middle of the transfer step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "transfer_step", interrupted)
    assert train.main(TINY + ["--out", str(tmp_path), "--save-every", "1"]) == 130
    saved = train.read_checkpoint(tmp_path / "checkpoint_transfer.pt")
    assert (saved["stage"], saved["iteration"]) == ("transfer", 2)
    monkeypatch.setattr(train, "transfer_step", real_step)
    assert train.main(["--resume", str(tmp_path), "--quiet"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads((tiny_run / "metrics.json").read_text())
    assert losses(tmp_path) == losses(tiny_run)


def test_a_non_finite_loss_stops_the_run_naming_the_loss_and_saving_nothing(tmp_path, capsys, monkeypatch):
    real = train.sim_step_loss
    monkeypatch.setattr(train, "sim_step_loss", lambda *a, **k: (lambda loss, logs: (loss * math.nan, logs))(
        *real(*a, **k)))
    assert train.main(TINY + ["--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss sim" in err and "iteration 0" in err and "--clip-grad" not in err  # the preset clips
    assert not list(tmp_path.glob("checkpoint_*"))
    assert train.main(TINY + ["--out", str(tmp_path / "unclipped"), "--clip-grad", "0"]) == 3
    assert "--clip-grad 1 caps Eq. (4)'s step" in capsys.readouterr().err  # the remedy, where it is off


def test_one_batch_is_overfitted_by_the_eq4_step():
    torch.manual_seed(0)
    import data
    ds = data.Shapes("train", size=32, num_images=4)
    x, y = torch.stack([ds[i][0] for i in range(4)]), torch.stack([ds[i][1] for i in range(4)])
    model = SIGN(data.shapes_embeddings(ds.class_names), num_seen=ds.num_seen, encoder="small", feat_dim=16,
                 pe_dim=8, heads=2, hidden=16, small_width=8).train()
    args = train.resolve(train.get_args_parser().parse_args([]))
    run = train.Run(args, torch.device("cpu"), model)
    opt = torch.optim.Adam([p for m in (model.E, model.SIM, model.C) for p in m.parameters()], lr=3e-3)
    history = [training_loss for training_loss in
               (train.training_step_sim(run, x, y, opt)[2]["sim"].item() for _ in range(60))]
    assert history[-1] < 0.3 * history[0], history[::10]


@pytest.mark.parametrize("dataset", sorted(train.PRESETS))
def test_every_preset_parses_through_the_real_parser(dataset):
    args = train.resolve(train.get_args_parser().parse_args(["--dataset", dataset]))
    for key, value in train.PRESETS[dataset].items():
        assert getattr(args, key) == value
    assert args.pretrained == (dataset != "shapes")


def test_a_missing_voc_root_gives_a_short_clear_message(tmp_path, capsys):
    (tmp_path / "t.npy").write_bytes(b"")  # --embeddings must exist; the missing root is found first after it
    code = train.main(["--dataset", "voc", "--data-root", str(tmp_path / "nowhere"), "--embeddings",
                       str(tmp_path / "t.npy"),
                       "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "VOCdevkit" in err and "README" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_init_from_a_finished_stage_runs_only_the_stages_after_it(tiny_run, tmp_path):
    args = [a for a in TINY if a != "ast"]
    args[args.index("--self-training") + 1:args.index("--self-training") + 1] = ["st"]
    code = train.main(args + ["--out", str(tmp_path), "--init-from", str(tiny_run / "checkpoint_transfer.pt")])
    assert code == 0
    assert {entry["stage"] for entry in losses(tmp_path)} == {"self_training", "self_training_transfer"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    first = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["transfer"] == first["transfer"]
    assert set(metrics) == {"train", "transfer", "self_training"}
    assert json.loads((tmp_path / "config.json").read_text())["self_training"] == "st"
    assert not (tmp_path / "checkpoint_train.pt").exists()


def tiny_voc_run(tmp_path, *flags: str) -> list[str]:
    """train.py flags for a tiny VOCdevkit written in the real on-disk formats under tmp_path,
    a random .npy class table, DeepLab-v2 on ResNet-18, 2 x 2 batches cropped to 32."""
    import numpy as np
    from test_data import make_voc
    make_voc(tmp_path / "data")
    table = tmp_path / "voc_classes.npy"
    np.save(table, np.random.default_rng(0).normal(size=(20, 600)).astype(np.float32))
    return ["--dataset", "voc", "--data-root", str(tmp_path / "data"), "--embeddings", str(table),
            "--backbone", "resnet18", "--no-pretrained", "--feat-dim", "16", "--pe-dim", "8", "--heads", "2",
            "--hidden", "16", "--batch-size", "2", "--crop-size", "32", "--workers", "0", "--device", "cpu",
            "--quiet", "--out", str(tmp_path / "run"), *flags]


def test_the_real_data_path_runs_on_a_tiny_voc_layout(tmp_path):
    """--dataset voc end to end: VOC reader, .npy class table, DeepLab-v2 (ResNet-18), metrics on 'val'."""
    assert train.main(tiny_voc_run(tmp_path, "--iters", "2", "--transfer-iters", "2", "--self-training", "none")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"train", "transfer"} and set(metrics["transfer"]) == {"val"}
    assert 0.0 <= metrics["transfer"]["val"]["harmonic_miou"] <= 100.0


def test_real_data_without_embeddings_is_refused_with_a_clear_message(tmp_path, capsys):
    from test_data import make_voc
    make_voc(tmp_path / "data")
    assert train.main(["--dataset", "voc", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                       "--quiet"]) == 2
    assert "--embeddings is required for voc" in capsys.readouterr().err


def test_the_voc_preset_trains_new_layers_at_10x_biases_at_20x_without_decay_and_poly_keeps_the_ratios():
    args = train.resolve(train.get_args_parser().parse_args(["--dataset", "voc"]))
    model = SIGN(torch.randn(20, 600), num_seen=15, encoder="resnet101", pretrained=False)
    opt = train.make_optimizers(model, args, transfer=False)["sim"]
    assert isinstance(opt, torch.optim.SGD) and args.lr == 2.5e-4
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    new = [model.E.aspp, model.SIM, model.C]
    assert ids[0] == {id(p) for p in model.E.body.parameters()}
    assert ids[1] == {id(p) for m in new for n, p in m.named_parameters() if not n.endswith("bias")}
    assert ids[2] == {id(p) for m in new for n, p in m.named_parameters() if n.endswith("bias")}
    # backbone, new weights, new biases
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 2.5e-3, 5e-3], rel=1e-12)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 5e-4, 0.0]
    poly = train.poly_schedule(opt, args.iters)
    opt.step()  # no gradients: changes nothing, and the schedule may follow
    poly.last_epoch = 29999
    poly.step()  # iteration 30000 of 40000
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(2.5e-4 * 0.25 ** 0.9) and lrs[1] / lrs[0] == pytest.approx(10)
    assert lrs[2] / lrs[0] == pytest.approx(20)
    args.lr_mult = 1.0
    single = train.make_optimizers(model, args, transfer=False)["sim"]  # --lr-mult 1
    assert len(single.param_groups) == 1 and single.param_groups[0]["weight_decay"] == 5e-4
    assert train.resolve(train.get_args_parser().parse_args([])).lr_mult == 1.0  # shapes: one Adam group


def test_a_crop_into_padding_gets_no_pseudo_label_there_while_unlabelled_image_pixels_do(tmp_path):
    """VOC images of 6 x 8 cropped to 32: most of the crop is padding, and the background (255
    inside the image) stays eligible for self-training."""
    import argparse
    import data
    from ast_weights import pseudo_labels
    from test_data import make_voc
    make_voc(tmp_path)
    dataset = data.VOC(tmp_path, "train", transform=data.train_transform(32, scale=(1.0, 1.0)))
    args = argparse.Namespace(batch_size=2, seed=0, workers=0)
    x, y, padding = next(train.batch_stream(dataset, args, "self_training", 0, torch.device("cpu")))
    assert padding.sum() == 2 * (32 * 32 - 6 * 8) and (y[padding] == 255).all()
    inside = (y == 255) & ~padding  # background, unseen and void pixels of the images
    assert inside.any()
    probs = torch.zeros(2, 20, 32, 32)
    probs[:, 17] = 1.0  # the teacher calls every pixel "sofa", an unseen class
    target, weight = pseudo_labels(probs, y, unseen=range(15, 20), mode="ast", padding=padding)
    assert (target[padding] == 255).all() and (weight[padding] == 0).all()
    assert (target[inside] == 17).all() and (weight[inside] == 1).all()


def test_a_npy_table_is_read_in_raw_id_order_unless_told_model_order(tmp_path):
    import numpy as np
    from test_data import make_context, raw_id_table
    make_context(tmp_path / "data")
    np.save(tmp_path / "t.npy", raw_id_table(33, 1))  # row r - 1 holds raw id r
    base = ["--dataset", "context", "--data-root", str(tmp_path / "data"), "--embeddings", str(tmp_path / "t.npy")]
    train_set, _, emb, _ = train.build_data(train.resolve(train.get_args_parser().parse_args(base)))
    assert int(emb[train_set.class_names.index("cow"), 0]) == 10
    _, _, emb, _ = train.build_data(train.resolve(train.get_args_parser().parse_args(
        base + ["--embeddings-order", "model"])))
    assert int(emb[train_set.class_names.index("cow"), 0]) == train_set.class_names.index("cow") + 1


def test_init_from_a_checkpoint_of_another_architecture_is_refused_naming_the_difference(tiny_run, tmp_path, capsys):
    code = train.main(TINY + ["--out", str(tmp_path / "r"), "--latent-path", "side",
                              "--init-from", str(tiny_run / "checkpoint_transfer.pt")])
    assert code == 2
    assert "--latent-path gate in the checkpoint, --latent-path side in this run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_self_training_on_real_crops_never_pseudo_labels_their_padding(tmp_path, monkeypatch):
    """The VOC images (6 x 8) are cropped to 32: train.py must hand the crop's padding to pseudo_labels."""
    seen = []

    def recording(probs, label, **kwargs):
        target, weight = real(probs, label, **kwargs)
        seen.append((kwargs["padding"], target, weight))
        return target, weight
    real = train.pseudo_labels
    monkeypatch.setattr(train, "pseudo_labels", recording)
    code = train.main(tiny_voc_run(tmp_path, "--iters", "1", "--transfer-iters", "1", "--self-training", "ast",
                                   "--self-training-iters", "1"))
    assert code == 0 and len(seen) == 2  # one self-training and one transfer iteration
    for padding, target, weight in seen:
        assert padding.float().mean() > 0.5  # at most 1.5 x (6 x 8) of the 32 x 32 crop is image
        assert (target[padding] == 255).all() and (weight[padding] == 0).all()


def test_the_layout_flag_reaches_the_training_and_test_sets_and_context_is_the_default():
    for flags, layout in (([], "context"), (["--layout", "uniform"], "uniform")):
        args = train.resolve(train.get_args_parser().parse_args(flags + ["--num-train", "8", "--num-test", "3", "2"]))
        train_set, tests, _, _ = train.build_data(args)
        assert train_set.layout == layout and [t.layout for t in tests.values()] == [layout, layout]
        assert [len(t) for t in tests.values()] == [3, 2]  # one count per test size
    assert train.resolve(train.get_args_parser().parse_args([])).self_training == "ast"  # SIGN + AST by default


def test_the_benchmark_times_both_steps_and_prints_img_per_s_their_ratio_and_memory(capsys):
    assert train.main(TINY + ["--benchmark", "2", "--amp"]) == 0
    out = capsys.readouterr().out
    rates = [float(line.split("img/s")[0].split()[-1]) for line in out.splitlines() if "img/s" in line]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert "SIGN step" in out and "DeepLab-v2 step" in out and "bfloat16" in out and "batch 4, crop 32" in out
    ratio = float(out.split("step time: ")[1].split()[0])
    assert ratio == pytest.approx(rates[1] / rates[0], rel=0.02)  # SIGN's time over DeepLab's
    assert "peak RSS" in out


def test_two_processes_under_torchrun_train_one_run_and_score_as_one_process_does(tmp_path):
    """gloo on the CPU: 2 ranks, a global batch of 4 split 2 + 2. One run folder; the ranks end
    with identical weights; the sharded evaluation (confusion matrices summed) equals the one-process
    evaluation of the saved checkpoint exactly."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    import evaluate
    out = tmp_path / "run"
    code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29600 + os.getpid() % 300), str(Path(train.__file__)), *TINY,
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert code.returncode == 0, code.stderr[-2000:]
    assert "DDP: the 2 ranks hold identical weights" in code.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert set(json.loads((out / "config.json").read_text())) >= {"batch_size", "amp_dtype"}
    assert len([1 for e in losses(out) if e["stage"] == "train"]) == 6  # one log, not one per rank
    model, ckpt = evaluate.load_checkpoint(out / "checkpoint_self_training_transfer.pt", "cpu")
    tests = evaluate.test_sets("shapes", sizes=[32, 48], num_images=4, layout="context")
    alone = evaluate.evaluate_sets(model, tests, class_names=ckpt["class_names"], num_seen=16, device="cpu",
                                   batch_size=4, quiet=True)
    assert alone == json.loads((out / "metrics.json").read_text())["self_training"]


def test_every_rank_draws_from_a_seed_no_other_rank_or_iteration_uses():
    seeds = {train.iteration_seed(0, stage, i) for stage in train.STAGES for i in range(-50, 5000)}
    assert train.rank_seed(train.iteration_seed(0, "transfer", 7), 0) == train.iteration_seed(0, "transfer", 7)
    for rank in (1, 2, 3, 7):
        assert not seeds & {train.rank_seed(s, rank) for s in seeds}, rank


def test_the_warm_up_ramps_linearly_into_poly_and_a_schedule_started_late_matches_one_stepped_there():
    def lrs(start, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        opt.param_groups[0]["initial_lr"] = 1.0  # as a resumed optimiser's saved state holds
        poly = train.poly_schedule(opt, 100, start, warmup=9)
        seen = [opt.param_groups[0]["lr"]]
        for _ in range(steps):
            opt.step()
            poly.step()
            seen.append(opt.param_groups[0]["lr"])
        return seen
    stepped = lrs(0, 60)
    assert stepped[:10] == pytest.approx([(i + 1) / 10 * (1 - i / 100) ** 0.9 for i in range(10)])
    assert stepped[10:] == pytest.approx([(1 - i / 100) ** 0.9 for i in range(10, 61)])
    assert lrs(37, 23) == stepped[37:]  # --resume mid-stage: the same rates, exactly


def test_clip_grad_caps_the_gradient_norm_of_the_step_and_zero_leaves_it_alone():
    for clip in (0.0, 0.5):
        layer = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(layer.parameters(), lr=0.0)
        loss = 100 * layer(torch.ones(2, 4)).square().sum()
        train.backward_step(loss, opt, torch.amp.GradScaler("cpu", enabled=False), clip)
        norm = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item()
        assert norm == pytest.approx(0.5, rel=1e-4) if clip else norm > 10



@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_run_resumed_mid_epoch_matches_the_uninterrupted_one_with_or_without_loader_workers(tmp_path, monkeypatch,
                                                                                             workers):
    """Each item's augmentation is drawn from (seed, stage, epoch, index), wherever a worker draws it."""
    import shutil
    flags = ["--iters", "6", "--transfer-iters", "2", "--self-training", "none", "--workers", workers,
             "--backbone", "small", "--small-width", "8"]  # GroupNorm: a random ResNet-18 diverges in 3 steps
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    argv = {folder: tiny_voc_run(folder, *flags) for folder in (whole, cut)}
    for folder in (whole, cut):  # 4 training images, batch 2: two batches an epoch
        top = folder / "data" / "VOCdevkit" / "VOC2012"
        for name in ("c", "d"):
            shutil.copy(top / "JPEGImages" / "a.jpg", top / "JPEGImages" / f"{name}.jpg")
            shutil.copy(top / "SegmentationClassAug" / "a.png", top / "SegmentationClassAug" / f"{name}.png")
        (top / "ImageSets/Segmentation/train_aug.txt").write_text("a\nb\nc\nd\n")
    assert train.main(argv[whole]) == 0
    calls, real_step = {"n": 0}, train.training_step_sim

    def interrupted(*args, **kwargs):  # iteration 3 is the middle of an epoch
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "training_step_sim", interrupted)
    assert train.main(argv[cut] + ["--save-every", "1"]) == 130
    assert train.read_checkpoint(cut / "run" / "checkpoint_train.pt")["iteration"] == 3
    monkeypatch.setattr(train, "training_step_sim", real_step)
    assert train.main(["--resume", str(cut / "run"), "--quiet"]) == 0
    for name in ("losses.jsonl", "metrics.json"):
        assert (cut / "run" / name).read_bytes() == (whole / "run" / name).read_bytes()


@pytest.mark.cli
def test_under_torchrun_a_bad_file_one_rank_reads_is_one_line_from_each_rank_and_no_traceback_of_ours(tmp_path):
    """A label only one rank reads: that rank names it in one line (torchrun adds its own report)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from test_data import write_label
    argv = tiny_voc_run(tmp_path, "--backbone", "small", "--small-width", "8", "--iters", "2", "--transfer-iters", "1",
                        "--self-training", "none")
    write_label(tmp_path / "data/VOCdevkit/VOC2012/SegmentationClass/b.png", np.full((6, 8), 77))
    code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29600 + os.getpid() % 300), str(Path(train.__file__)), *argv],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ours = [line for line in code.stderr.splitlines() if line.startswith("train.py: error:")]
    assert code.returncode != 0 and sum("b.png" in line for line in ours) == 1, code.stderr[-3000:]
    # The other rank says a peer stopped, unless torchrun's SIGTERM ends it first (no message then)
    assert all("b.png" in line or "another process of this torchrun stopped" in line for line in ours)
    assert 'train.py", line' not in code.stderr  # no traceback through train.py
