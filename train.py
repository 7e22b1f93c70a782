"""Train SIGN end to end: the paper's three steps, self-training, and evaluation after each stage.

``python train.py`` runs the whole pipeline on the built-in ``shapes`` benchmark on a CPU in
minutes; ``python train.py --dataset voc --data-root DIR --embeddings w2v.bin ft.vec`` runs
it on Pascal VOC with the paper's settings (PROTOCOL section 1).

Reading order (the code's order; the paper's algorithm is sections 3.2 and 3.4)
    PRESETS              dataset defaults, each flag's help naming the paper's value
    poly_lr, param_groups, make_optimizer   the optimisers and DeepLab-v2's learning-rate groups
    Segmenter, Synthesis, step_networks     what each DistributedDataParallel wrapper holds
    training_step_sim    Training Step (SIM), Eq. (4): E, SIM, C on real seen labels
    training_step_g      Training Step (G), Eqs. (7)-(8): D, then G, on E/SIM's fixed features
    random_label_map     the pseudo ground truth y^ with unseen classes fed to M and G (Eq. 9)
    transfer_step        Transfer Learning Step, Eq. (10): C on real + synthetic features
    batch_stream, run_stage   one stage's loop: per-iteration seeds, batches, progress bar, log
    get_args_parser, resolve, build_data, evaluate_stage   flags, the data, scoring a stage
    save_checkpoint, checkpoints, architecture_differences   checkpoints and what they hold
    check_settings, settings   every flag's range and --resume / --init-from's checkpoint, checked
                         before any data is read (one line naming the flag, exit 2)
    main, run_main, train_all   stage 1 = SIM + G jointly (the paper: "we jointly optimize
                         them"); stage 2 = transfer; stage 3 = self-training (ST / AST, Eq. 17;
                         AST by default, the paper's SIGN + AST), then the transfer step again;
                         evaluation after every stage
    benchmark            --benchmark: the SIGN step against a plain DeepLab-v2 step
    add_classes_main     --add-classes: classes named after training (SIGN.with_classes), then
                         the Transfer Learning Step again; --seen-only trains a stage 1 that
                         knows no unseen name, to add them this way
    EXPERIMENTS, reproduce  the paper's tables on shapes as train.py flags, run as
                         ``python train.py`` processes (``--reproduce DIR``);
                         ``evaluate.reproduction_tables`` aggregates the folders

Symbols: x image, y label map (255 = ignore), F_x = SIM's features, z SIM's latent,
F^_x = G(M(y) (+) z) synthetic features, alpha / beta the loss weights of Eqs. (4) / (8),
T the AST temperature of Eq. (17).

Choices the paper leaves open (README "Deviations" lists them too)
    * Eq. (4)'s cross-entropy is computed on C's logits upsampled to the label's size; the
      Transfer Learning Step works at feature resolution, where G's features live.
    * Transfer Learning Step: E and SIM are frozen and run in eval mode (z = mu); y^ is an
      i.i.d. per-pixel label map in which a pixel is unseen with probability
      ``--unseen-rate`` (uniform over the unseen classes) and seen otherwise; z ~ N(0, 1).
    * Learning rates (``param_groups``): the paper gives one SGD rate, 2.5e-4, for E, SIM and C.
      DeepLab-v2 as CaGNet and SIGN train it multiplies it for layers trained from scratch:
      ASPP weights x10, ASPP biases x20 without weight decay (CaGNet's contextual module x5).
      ``--lr-mult 10`` (the real-data presets) gives the ResNet body x1, the weights of ASPP,
      SIM and C x10 and their biases x20 without weight decay, in stage 1, self-training and
      C's transfer step alike; SIM follows ASPP's x10 rather than CaGNet's x5 because the paper
      trains SIM and C with one optimiser. The poly schedule scales every group by its
      multiplier. ``--lr-mult 1`` is one group (the ablation; the ``shapes`` preset, whose
      small encoder is trained from scratch with Adam).
    * Self-training: a frozen copy of the model after the transfer step (the teacher)
      pseudo-labels each training batch (``ast_weights.pseudo_labels``), except the random
      crop's padding (``data.PADDING``, ignored like 255 otherwise). E, SIM and C are
      fine-tuned on the pseudo-labelled batch with Eq. (4), softmax over all classes and
      per-pixel weights (Eq. 9 with Eq. 17's weights), while D and G keep training on the
      real seen labels (Eq. 8), so G follows the fine-tuned feature space. The transfer step
      then runs again with the pseudo-labels (and their weights) as its real targets, so C
      keeps what it learnt from real unseen pixels while seeing synthetic ones.
    * Every iteration reseeds torch from (seed, stage, iteration), so a run resumed from a
      checkpoint replays exactly the batches, augmentations and noise it would have drawn.
      A stage's checkpoint is written before its evaluation and again after it, so a bad
      test file, Ctrl-C or a full disk never loses a finished stage; resumed, the evaluation
      that did not finish runs first.
    * ``torchrun --nproc_per_node N train.py ...`` trains with DistributedDataParallel (NCCL on
      CUDA, gloo on the CPU); ``step_networks`` says what each wrapper holds and how it relates
      to the detaches. ``--batch-size`` is the global batch: every rank takes its slice of the
      same global batch order, and draws its noise from a seed of (seed, stage, iteration) and
      its rank (``rank_seed``), so a run resumes exactly at any N. A non-finite loss on any
      rank stops every rank before anything is saved. The class-wise MMD (Eq. 5) is computed per rank on its
      slice and the gradients averaged: the paper's per-batch estimator on batches of B / N,
      not the MMD of the whole global batch (a kernel statistic is not a mean over samples).
      Rank 0 alone prints and writes; ``losses.jsonl`` holds rank 0's losses on its slice.
      Evaluation is sharded over the ranks and the confusion matrices summed, so the scores
      are the one-process scores.
    * The reproduction runner lives here, beside the flags it combines, and starts each run
      as its own ``python train.py`` process: two of them keep two cores busy (one thread
      each, which beats one run on two threads), a failing run cannot take the others down,
      each run is exactly the command a user would type, and ``evaluate.py`` stays a reader
      of results that never imports this module.
    * The ``shapes`` preset trains its small encoder from scratch, so it departs from the
      paper's optimiser settings: Adam (lr 3e-3, poly) instead of SGD 2.5e-4, and alpha = 10
      instead of 100, chosen on the tuning seeds 100-102 (README "What z carries"). The
      real-data presets keep the paper's values.
"""
import argparse
import copy
import errno
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import evaluate
from ast_weights import pseudo_labels
from sign import SIGN, discriminator_loss, generator_loss, resize_labels, sim_step_loss, transfer_loss

PRESETS = {  # defaults per dataset; every flag below can override them
    "shapes": dict(backbone="small", small_width=64, feat_dim=64, pe_dim=32, heads=4, hidden=128,
                   optimizer="adam", lr=3e-3, lr_transfer=1e-3, lr_g=1e-3, lr_d=1e-3, alpha=10.0, beta=50.0,
                   crop_size=64, batch_size=16, iters=2000, transfer_iters=400, self_training_iters=400,
                   temperature=2.0, unseen_rate=0.5, mmd_pixels=64, test_sizes=[64, 128], workers=0, lr_mult=1.0,
                   num_test=[2000, 300]),
    "voc": dict(backbone="resnet101", small_width=64, feat_dim=600, pe_dim=600, heads=8, hidden=256,
                optimizer="sgd", lr=2.5e-4, lr_transfer=2.5e-4, lr_g=2e-4, lr_d=2.5e-4, alpha=100.0, beta=50.0,
                crop_size=368, batch_size=8, iters=40000, transfer_iters=6000, self_training_iters=6000,
                temperature=2.0, unseen_rate=0.5, mmd_pixels=256, test_sizes=[513], workers=4, lr_mult=10.0,
                num_test=None),
}
PRESETS["context"] = dict(PRESETS["voc"], transfer_iters=10000, self_training_iters=10000)
PRESETS["cocostuff"] = dict(PRESETS["voc"], transfer_iters=10000, self_training_iters=10000)
STAGES = ("train", "transfer", "self_training", "self_training_transfer")
# A run whose saved settings lack one of these keys was trained with this value: resumed, it keeps it.
UNSAVED = dict(latent_path="side", lr_mult=1.0, embeddings_order="model", layout="uniform")
COMPLETE = 10**12  # the iteration --init-from gives its checkpoint's stage: past any stage's end


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or inf; the run stops before anything is stepped or saved."""


def check_finite(stage: str, iteration: int, **losses: torch.Tensor) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLoss(f"non-finite loss {name} = {value.item()} at stage {stage!r}, "
                                f"iteration {iteration}; nothing was saved for this iteration")


def poly_lr(base: float, iteration: int, total: int, power: float = 0.9) -> float:
    """DeepLab's poly schedule, lr = base * (1 - i / total)^power (paper section 4.2)."""
    return base * (1 - iteration / max(total, 1)) ** power


def param_groups(backbone: Sequence[nn.Module | None], new: Sequence[nn.Module | None],
                 lr_mult: float) -> list[dict]:
    """DeepLab-v2's learning-rate groups: the ``backbone`` at the base rate; the layers trained
    from scratch (``new``) at ``lr_mult`` times it for weights and twice that for biases, which
    get no weight decay. ``lr_mult = 1`` gives one group. Each group carries its ``lr_mult``."""
    def named(modules):
        return [(n, p) for m in modules if m is not None for n, p in m.named_parameters() if p.requires_grad]
    base = [p for _, p in named(backbone)]
    if lr_mult == 1:
        return [dict(params=base + [p for _, p in named(new)], lr_mult=1.0)]
    groups = [dict(params=base, lr_mult=1.0),
              dict(params=[p for n, p in named(new) if not n.endswith("bias")], lr_mult=lr_mult),
              dict(params=[p for n, p in named(new) if n.endswith("bias")], lr_mult=2 * lr_mult,
                   weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def make_optimizer(kind: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The paper's SGD (section 4.2) or Adam, which trains the small benchmark encoder from scratch
    faster, over ``param_groups``; each group starts at ``lr`` times its multiplier."""
    groups = [dict(g, lr=lr * g["lr_mult"]) for g in groups]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(groups, lr=lr)


def sim_step_groups(model: SIGN, lr_mult: float) -> list[dict]:
    """``param_groups`` of E, SIM and C: the ResNet body (all of the small encoder) is the backbone;
    ASPP, SIM and C are trained from scratch."""
    return param_groups([getattr(model.E, "body", model.E)],
                        [getattr(model.E, "aspp", None), model.SIM, model.C], lr_mult)


def set_poly_lr(optimizer: torch.optim.Optimizer, base: float, iteration: int, total: int) -> None:
    """Every group follows the poly schedule at its own multiple of ``base``."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(base * group.get("lr_mult", 1.0), iteration, total)


# ----------------------------------------------------------------------------- what each step trains
class Segmenter(nn.Module):
    """E, SIM and C behind one forward, x -> (C(F_x), F_x, z, mu, logvar): what Eq. (4) trains."""
    features = SIGN.features  # SIGN's own Eq. (1), read from self.E and self.SIM

    def __init__(self, model: SIGN):
        super().__init__()
        self.E, self.SIM, self.C = model.E, model.SIM, model.C

    def forward(self, x: torch.Tensor):
        F_x, z, mu, logvar = self.features(x)  # Eq. (1)
        return self.C(F_x), F_x, z, mu, logvar  # (B, K, h, w), then SIM's outputs


class Synthesis(nn.Module):
    """M and G behind one forward, (y, z) -> F^_x = G(M(y) (+) z): what Eq. (8) trains."""
    generate = SIGN.generate  # SIGN's own, read from self.M, self.G and self.latent_dim

    def __init__(self, model: SIGN):
        super().__init__()
        self.M, self.G, self.latent_dim = model.M, model.G, model.latent_dim

    def forward(self, labels: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.generate(labels, z)


def step_networks(model: SIGN, world: int = 1, *, transfer: bool = False) -> argparse.Namespace:
    """The modules a stage's steps call, each the set of networks one step trains: E + SIM + C for
    Eq. (4), M + G for Eq. (8) and D for Eq. (7) in stage 1 and self-training; C alone in the
    transfer steps. With ``world`` > 1 the ones the stage trains are wrapped in
    DistributedDataParallel, which averages exactly their gradients over the ranks. The
    detaches in sign.py's losses still decide which network a loss reaches (D's side of Eq. 8
    is called unwrapped, with its weights detached), so a wrapper only ever averages gradients
    its own step computed."""
    def wrap(module: nn.Module, trained: bool) -> nn.Module:
        return DistributedDataParallel(module) if world > 1 and trained else module
    return argparse.Namespace(sim=wrap(Segmenter(model), not transfer), G=wrap(Synthesis(model), not transfer),
                              D=wrap(model.D, not transfer), C=wrap(model.C, transfer))


# ----------------------------------------------------------------------------- the steps
def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)


def training_step_sim(model, x, y, opt, run, *, weight=None, seen_only=True, padding=None):
    """Training Step (SIM), Eq. (4): L_pred^train + alpha L_KLD for E, SIM and C.

    Returns SIM's outputs, detached, for Training Step (G), and the losses for the log.
    ``seen_only`` restricts the softmax to the seen classes (Eq. 3); self-training turns it
    off and passes the AST / ST weights of its pseudo-labels. The KL term of Eq. (2) averages
    over the pixels inside the image: ``padding`` (B, H, W) marks the crop's padding.
    """
    nets = getattr(run, "nets", None) or step_networks(model)
    with run.autocast():
        logits, F_x, z, mu, logvar = nets.sim(x)  # Eq. (1): F_x, z = SIM(E(x) (+) PE); C(F_x)
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        inside = None if padding is None else resize_labels(padding.long(), F_x.shape[-2:]) == 0  # (B, h, w)
        loss, logs = sim_step_loss(logits, y, mu, logvar, num_seen=model.num_seen if seen_only else None,
                                   alpha=run.args.alpha, weight=weight, kl_mask=inside)  # Eq. (4)
    backward_step(loss, opt, run.scaler)
    return F_x.detach(), None if z is None else z.detach(), {"sim": loss.detach(), **logs}


def training_step_g(model, F_x, z, y, opt_g, opt_d, run):
    """Training Step (G), Eqs. (7)-(8): D maximises L_adv, G minimises L_adv + beta L_MMD.

    E and SIM are fixed: F_x and z arrive detached. Without SIM, or with ``--latent noise``
    (ZS3Net-style), z is None and G draws pure noise.
    """
    nets = getattr(run, "nets", None) or step_networks(model)
    with run.autocast():
        y = resize_labels(y, F_x.shape[-2:])  # (B, h, w)
        fake = nets.G(y, z)  # F^_x = G(M(y) (+) z), (B, F, h, w)
        d_loss = discriminator_loss(nets.D, F_x, fake, y)  # Eq. (7), max over D
    backward_step(d_loss, opt_d, run.scaler)
    with run.autocast():  # G plays against the D just updated, as in alternating GAN training
        g_loss, logs = generator_loss(model.D, F_x, fake, y, model.seen_classes, beta=run.args.beta,
                                      sigmas=run.args.mmd_sigmas, max_per_class=run.args.mmd_pixels)  # Eq. (8)
    backward_step(g_loss, opt_g, run.scaler)
    return {"d": d_loss.detach(), "g": g_loss.detach(), **logs}


def random_label_map(B: int, h: int, w: int, *, num_seen: int, num_unseen: int, unseen_rate: float,
                     device: torch.device) -> torch.Tensor:
    """y^ of Eq. (9), (B, h, w): each pixel unseen with probability ``unseen_rate``, else seen."""
    seen = torch.randint(0, num_seen, (B, h, w), device=device)
    unseen = torch.randint(num_seen, num_seen + num_unseen, (B, h, w), device=device)
    return torch.where(torch.rand(B, h, w, device=device) < unseen_rate, unseen, seen)


def transfer_step(model, x, y, opt_c, run, *, weight=None):
    """Transfer Learning Step, Eqs. (9)-(10): C on real features and G's synthetic ones.

    E, SIM and G are fixed (the model is in eval mode, so z = mu for the real features and
    z ~ N(0, 1) for the synthetic ones). ``y`` may hold self-training pseudo-labels with
    per-pixel ``weight``.
    """
    with torch.no_grad(), run.autocast():
        F_x = model.features(x)[0]  # (B, F, h, w)
        B, _, h, w = F_x.shape
        y_hat = random_label_map(B, h, w, num_seen=model.num_seen, num_unseen=run.num_unseen,
                                 unseen_rate=run.args.unseen_rate, device=x.device)
        fake = model.generate(y_hat)  # F^_x = G(M(y^) (+) z), z ~ N(0, 1)
    if weight is not None:
        weight = F.interpolate(weight[:, None], size=(h, w), mode="nearest")[:, 0]  # as resize_labels
    with run.autocast():
        C = (getattr(run, "nets", None) or step_networks(model, transfer=True)).C
        loss, logs = transfer_loss(C, F_x, resize_labels(y, (h, w)), fake, y_hat, weight=weight)  # Eq. (10)
    backward_step(loss, opt_c, run.scaler)
    return {"transfer": loss.detach(), **logs}


def transfer_optimizer(model: SIGN, args) -> tuple[dict, list]:
    """The Transfer Learning Step's optimiser, C's alone, and its poly schedule; E, SIM and G are
    fixed and in eval mode (z = mu for real features)."""
    model.eval()
    opts = {"c": make_optimizer(args.optimizer, param_groups([], [model.C], args.lr_mult), args.lr_transfer)}
    return opts, [(opts["c"], args.lr_transfer)]


# ----------------------------------------------------------------------------- the loop
def iteration_seed(seed: int, stage: str, iteration: int) -> int:
    return (seed * 1000003 + STAGES.index(stage) * 100003 + iteration) % 2**63


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for every rank (rank 0 keeps ``seed``): the rank in a slot of its own,
    so that rank r never reuses another iteration's seed (seeds differ by 1 per iteration)."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**63


def batch_stream(dataset, run, stage: str, start: int):
    """Endless training batches (x, y, padding); the order of epoch e is a permutation seeded by
    (seed, stage, e), so the stream can restart at any iteration ``start``. ``padding`` (B, H, W)
    marks the random crop's padding (``data.PADDING``), which becomes ignore (255) in y."""
    B, rank, world = run.args.batch_size, getattr(run, "rank", 0), getattr(run, "world", 1)
    per_epoch = len(dataset) // B
    if per_epoch == 0:
        raise ValueError(f"--batch-size {B} is larger than the training set ({len(dataset)} images)")
    it = start
    while True:
        epoch = it // per_epoch
        g = torch.Generator().manual_seed(iteration_seed(run.args.seed, stage, -1 - epoch))
        order = torch.randperm(len(dataset), generator=g).view(-1)[: per_epoch * B].view(per_epoch, B)
        order = order[:, rank * B // world:(rank + 1) * B // world]  # this rank's slice of every global batch
        if rank:  # the workers' augmentation seeds come from g: each rank its own
            g = torch.Generator().manual_seed(rank_seed(iteration_seed(run.args.seed, stage, -1 - epoch), rank))
        # Its own generator: creating a loader iterator draws a seed, which must not come from
        # (and shift) the global stream that this iteration's noise is drawn from.
        loader = DataLoader(dataset, batch_sampler=order[it % per_epoch:].tolist(), generator=g,
                            num_workers=run.args.workers, pin_memory=run.device.type == "cuda")
        for x, y in loader:
            padding = y == data.PADDING  # (B, H, W): outside the image, never pseudo-labelled
            y = y.masked_fill(padding, data.IGNORE)
            yield (x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True),
                   padding.to(run.device, non_blocking=True))
            it += 1


def run_stage(stage: str, total: int, step, poly, run, start: int = 0, save=None) -> None:
    """Iterations ``start..total-1`` of one stage: reseed, fetch a batch, set poly learning
    rates, ``step(x, y, padding) -> losses``, stop on a non-finite loss, log, save every --save-every."""
    batches = batch_stream(run.train_set, run, stage, start)
    main_rank = getattr(run, "rank", 0) == 0
    bar = tqdm(range(start, total), desc=stage, dynamic_ncols=True, disable=run.args.quiet or not main_rank)
    for i in bar:
        run.at = f"stage {stage}, iteration {i}"
        # each rank draws its own noise for its slice of the batch; rank 0 (and one process) as before
        torch.manual_seed(rank_seed(iteration_seed(run.args.seed, stage, i), getattr(run, "rank", 0)))
        x, y, padding = next(batches)
        for opt, base in poly:
            set_poly_lr(opt, base, i, total)
        logs = step(x, y, padding)
        if getattr(run, "world", 1) > 1:  # a NaN on one rank reaches every rank's weights: all stop
            here = all(bool(torch.isfinite(v).all()) for v in logs.values())
            everywhere = torch.tensor(float(here), device=run.device)
            dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
            if here and everywhere.item() < 1:
                raise NonFiniteLoss(f"a non-finite loss on another rank at stage {stage!r}, iteration {i}; "
                                    f"nothing was saved for this iteration")
        check_finite(stage, i, **logs)
        run.scaler.update()
        if i % run.args.log_every == 0 or i == total - 1:
            logs = {k: round(v.item(), 5) for k, v in logs.items()}
            bar.set_postfix(logs, refresh=False)
            if run.out and main_rank:  # --add-classes writes its checkpoint and no run folder
                with open(run.out / "losses.jsonl", "a") as f:
                    f.write(json.dumps({"stage": stage, "iteration": i, **logs}) + "\n")
        if save and run.args.save_every and (i + 1) % run.args.save_every == 0 and i + 1 < total:
            save(i + 1)


# ----------------------------------------------------------------------------- the CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train SIGN (Cheng et al., ICCV 2021). Flags left out take "
                                "the --dataset preset's value (train.PRESETS). 'python train.py --reproduce DIR "
                                "--help': the runner of the paper's tables on shapes.")
    a = p.add_argument
    a("--dataset", default="shapes", choices=sorted(PRESETS), help="default: shapes, the built-in benchmark")
    a("--data-root", default="data", help="folder holding the dataset (README 'Datasets'); default: data")
    a("--layout", default="context", choices=data.SHAPES_LAYOUTS,
      help="shapes: where things stand; context, circles and crosses mostly above the horizon, squares and "
      "triangles mostly below (default; README 'The built-in benchmark'), or uniform, anywhere")
    a("--embeddings", nargs="+", help="word2vec .bin and fastText .vec files (paper: both, 600-d), or one "
      ".npy table; shapes makes its own seeded vectors")
    a("--embeddings-order", default="raw", choices=["raw", "model"],
      help="row order of a .npy table: raw, ascending raw label id (default; README 'Class embeddings'), "
      "or model, the dataset's class_names order (seen classes, then unseen)")
    a("--out", help="run folder; default runs/<dataset>-<timestamp>")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint, with its settings")
    a("--init-from", metavar="CHECKPOINT", help="start after the stage this end-of-stage checkpoint of another run "
      "finished (e.g. runs/x/checkpoint_transfer.pt to try self-training settings); settings from these flags")
    a("--seen-only", action="store_true", help="stage 1 alone, with the unseen classes absent from M and C: a "
      "model that knows no unseen name, for 'evaluate.py --add-classes' (README 'Your own classes')")
    a("--add-classes", nargs="*", metavar="NAME", help="with --init-from CK and --save-as NEW.pt: append these "
      "classes (unseen) to M and C and rerun the Transfer Learning Step, Eq. (10); what 'evaluate.py "
      "--add-classes' runs")
    a("--save-as", metavar="NEW.pt", help="--add-classes: the checkpoint to write")
    a("--benchmark", type=int, nargs="?", const=20, metavar="ITERS", help="instead of training: time ITERS "
      "(default 20) iterations of the SIGN step (Eq. 4 + Eqs. 7-8) and of a plain DeepLab-v2 step (E -> C -> "
      "cross-entropy) on random tensors of the preset's size, interleaved; print img/s, the ratio, peak memory")
    a("--seed", type=int, default=0, help="default: 0")
    a("--device", help="default: cuda if available, else cpu")
    a("--amp", action=argparse.BooleanOptionalAction, default=False, help="mixed precision: float16 autocast with a "
      "GradScaler on CUDA, bfloat16 autocast on the CPU; the losses stay float32; default: off")
    a("--quiet", action="store_true", help="no progress bars")
    m = p.add_argument_group("model (paper section 3; defaults: the paper's best)")
    m.add_argument("--sim", default="multihead", choices=["none", "conv", "attention", "self-attention", "multihead"],
                   help="SIM architecture (Table 2); default and paper's best: multihead; none = no SIM")
    m.add_argument("--latent-path", default="gate", choices=["gate", "side"],
                   help="how SIM's z reaches F_x: gate, F_x = h + h * sigmoid(z), so C's loss trains z "
                   "(default; the lineage), or side, F_x = h and z read by G alone (z stays at the prior)")
    m.add_argument("--latent", choices=["sim", "noise"],
                   help="G's latent in Training Step (G): SIM's z (default with a SIM; paper) or pure N(0, 1) "
                   "noise (ZS3Net; the only choice with --sim none)")
    m.add_argument("--pe", default="rpe", choices=["none", "ape", "ape-interp", "rpe"],
                   help="positional encoding (Table 3); default and paper: rpe")
    m.add_argument("--backbone", choices=["resnet101", "resnet50", "resnet18", "small"],
                   help="E; shapes: small, real data and paper: resnet101 (DeepLab-v2)")
    m.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="ImageNet weights for the ResNet; default: on for real data (paper), off for shapes")
    for name, what in [("feat-dim", "feature channels F (paper: 600)"), ("pe-dim", "PE channels (paper: 600)"),
                       ("small-width", "channels of the small CNN encoder"),
                       ("heads", "attention heads (paper: not stated)"), ("hidden", "G / D hidden width")]:
        m.add_argument(f"--{name}", type=int, help=f"{what}; shapes: {PRESETS['shapes'][name.replace('-', '_')]}, "
                       f"real data: {PRESETS['voc'][name.replace('-', '_')]}")
    o = p.add_argument_group("optimisation (paper section 4.2; preset values shapes / voc)")
    for name, typ, paper in [("iters", int, "40000"), ("transfer-iters", int, "6000 VOC, 10000 Context"),
                             ("self-training-iters", int, "not stated"), ("batch-size", int, "8"),
                             ("crop-size", int, "368"), ("lr", float, "2.5e-4 SGD, poly 0.9"),
                             ("lr-transfer", float, "not stated; C's weights x --lr-mult, biases x 2 --lr-mult"),
                             ("lr-g", float, "2e-4 Adam"),
                             ("lr-d", float, "not stated; lineage 2.5e-4"), ("alpha", float, "100"),
                             ("beta", float, "50"), ("temperature", float, "2"),
                             ("unseen-rate", float, "not stated"), ("mmd-pixels", int, "all pixels"),
                             ("workers", int, "-")]:
        key = name.replace("-", "_")
        o.add_argument(f"--{name}", type=typ, help=f"default: {PRESETS['shapes'][key]} / {PRESETS['voc'][key]}; "
                       f"paper: {paper}")
    o.add_argument("--lr-mult", type=float, help="learning-rate multiplier of the layers trained from scratch "
                   "(ASPP, SIM, C): weights x it, biases x twice it without weight decay, the backbone x 1; "
                   "1 = one group; default: 1 / 10; lineage (DeepLab-v2): 10")
    o.add_argument("--optimizer", choices=["sgd", "adam"], help="for E, SIM, C (and C in the transfer step); "
                   "default: adam / sgd; paper: SGD, momentum 0.9, weight decay 5e-4")
    o.add_argument("--self-training", default="ast", choices=["none", "st", "ast"],
                   help="stage 3: annealed self-training (ast, Eq. 17; default, the paper's SIGN + AST), "
                   "ZS3Net's top-75%% (st), or none")
    o.add_argument("--keep", type=float, default=0.75, help="fraction ST keeps per unseen class; default and ZS3Net: 0.75")
    o.add_argument("--mmd-sigmas", type=float, nargs="+", help="MMD kernel bandwidths; default: mmd.DEFAULT_SIGMAS; "
                   "paper: 1 (see README 'Deviations')")
    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--test-sizes", type=int, nargs="+", help="shapes: test image sizes (default 64 128); real data: "
                   "the warp size of --eval-res feature (default 513)")
    e.add_argument("--eval-res", default="full", choices=["full", "feature"],
                   help="score at the label's resolution (default) or the lineage's feature resolution")
    e.add_argument("--num-train", type=int, help="shapes training images; default: 2000")
    e.add_argument("--num-test", type=int, nargs="+", help="shapes test images, one count for every test size or "
                   f"one per size; default: {' '.join(map(str, PRESETS['shapes']['num_test']))}")
    e.add_argument("--log-every", type=int, default=10, help="default: 10")
    e.add_argument("--save-every", type=int, default=0, help="also checkpoint every N iterations; default: 0 (per stage)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag left out from the dataset's preset."""
    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.pretrained is None:
        args.pretrained = args.dataset != "shapes"
    if getattr(args, "latent", None) is None:  # runs saved before --latent existed have none
        args.latent = "noise" if args.sim == "none" else "sim"
    if args.mmd_sigmas is None:
        from mmd import DEFAULT_SIGMAS
        args.mmd_sigmas = list(DEFAULT_SIGMAS)
    if args.out is None:
        args.out = f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


# ----------------------------------------------------------------------------- the data, scoring a stage, checkpoints
def build_data(args, tests: bool = True):
    """Training set, test sets by name (None with ``tests=False``), and the class-embedding table behind M."""
    tests = evaluate.test_sets(args.dataset, root=args.data_root, sizes=args.test_sizes, eval_res=args.eval_res,
                               num_images=args.num_test, layout=args.layout) if tests else None
    if args.dataset == "shapes":  # the benchmark itself is fixed (scene seed 0); --seed varies training
        train_set = data.Shapes("train", size=args.crop_size, num_images=args.num_train, layout=args.layout)
        return train_set, tests, data.shapes_embeddings(train_set.class_names)
    train_set = data.build_dataset(args.dataset, "train", root=args.data_root,
                                   transform=data.train_transform(args.crop_size))
    if not args.embeddings:
        raise data.EmbeddingError(f"--embeddings is required for {args.dataset}: the word2vec .bin and fastText "
                                  f".vec files, or a .npy table (README 'Datasets')")
    return train_set, tests, data.load_class_embeddings(args.embeddings, train_set.class_names,
                                                        raw_ids=train_set.raw_ids, order=args.embeddings_order)


def evaluate_stage(run, stage: str) -> None:
    """Score every test set (tables printed), record the results in metrics.json."""
    run.at = f"evaluating after stage {stage}"
    run.metrics[stage] = evaluate.evaluate_sets(
        run.model, run.tests, class_names=run.train_set.class_names, num_seen=run.model.num_seen, device=run.device,
        eval_res=run.args.eval_res, batch_size=run.args.batch_size, workers=run.args.workers,
        quiet=run.args.quiet, title=stage)
    write_metrics(run)


def write_metrics(run) -> None:
    """metrics.json, atomically: a reader (``evaluate.py --tables``) never sees half a file. Rank 0 alone."""
    if getattr(run, "rank", 0):
        return
    tmp = run.out / "metrics.json.tmp"
    tmp.write_text(json.dumps(run.metrics, indent=2))
    os.replace(tmp, run.out / "metrics.json")


class CheckpointWriteError(OSError):
    """torch.save failed (a full disk, most often); the temporary file is gone, older checkpoints intact."""


def save_checkpoint(run, stage: str, iteration: int, optimizers: dict, path: Path | None = None) -> None:
    """Everything needed to continue or evaluate, written atomically (temporary file, rename) to
    ``path`` (default ``checkpoint_<stage>.pt`` in the run folder): a failed or interrupted
    write removes its temporary file and leaves the previous checkpoint. Rank 0 alone writes."""
    if getattr(run, "rank", 0):
        return
    state = {"model": run.model.state_dict(), "config": run.model.config, "args": vars(run.args),
             "stage": stage, "iteration": iteration, "metrics": run.metrics,
             "class_names": run.class_names[:run.model.config["num_classes"]],
             "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
             "scaler": run.scaler.state_dict(), "rng": torch.get_rng_state()}
    path = path or run.out / f"checkpoint_{stage}.pt"
    tmp = path.with_name(path.name + ".tmp")
    run.at = f"writing {path.name} at stage {stage}, iteration {iteration}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, KeyboardInterrupt):
            raise
        free = shutil.disk_usage(path.parent).free
        why = ("no space left on the device" if getattr(err, "errno", None) == errno.ENOSPC or free < 2**20
               else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
        raise CheckpointWriteError(f"cannot write {path}: {why} ({free / 2**20:.0f} MiB free)") from err


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, newest first by stage order (a stage's file is rewritten in place)."""
    return [p for p in (run_dir / f"checkpoint_{s}.pt" for s in reversed(STAGES)) if p.is_file()]


def newest_checkpoint(run_dir: Path) -> Path | None:
    return next(iter(checkpoints(run_dir)), None)


def resumable(out: Path) -> str:
    """Where an interrupted run can go on from, for its last message."""
    last = newest_checkpoint(out) if out.is_dir() else None
    return (f"the last checkpoint, {last}, is intact: continue with python train.py --resume {out}" if last
            else "no checkpoint was written yet")


# The flag behind each SIGN.config key; the others follow from the dataset and --embeddings.
CONFIG_FLAGS = {"encoder": "backbone", "feat_dim": "feat-dim", "sim": "sim", "pe": "pe", "pe_dim": "pe-dim",
                "latent_dim": "feat-dim", "heads": "heads", "hidden": "hidden", "train_size": "crop-size",
                "small_width": "small-width", "latent_path": "latent-path"}


def architecture_differences(saved: dict, built: dict) -> str:
    """'--flag A in the checkpoint, --flag B in this run' for each architecture setting in which
    two SIGN configs differ (``pretrained`` only says where the first weights came from,
    ``train_size`` matters to ``pe="ape-interp"`` alone); '' when they agree."""
    saved = {"latent_path": UNSAVED["latent_path"], **saved}  # as SIGN.from_config reads it
    ignored = {"pretrained"} | ({"train_size"} if built["pe"] != "ape-interp" else set())

    def shown(key, value):
        value = value[0] if key == "train_size" and value else value
        return f"--{CONFIG_FLAGS[key]} {value}" if key in CONFIG_FLAGS else f"{key} {value}"
    return ", ".join(f"{shown(k, saved.get(k))} in the checkpoint, {shown(k, v)} in this run"
                     for k, v in built.items() if k not in ignored and saved.get(k) != v)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint this module wrote, with what continuing from it needs (``evaluate.read_checkpoint``)."""
    return evaluate.read_checkpoint(path, keys=("model", "config", "args", "stage", "iteration", "metrics"))


# ----------------------------------------------------------------------------- settings, checked
class SettingsError(ValueError):
    """A flag out of its range or at odds with another: one line naming it, before any work."""


STAGE_LENGTH = {"train": "iters", "transfer": "transfer_iters", "self_training": "self_training_iters",
                "self_training_transfer": "transfer_iters"}
EVALUATED_AS = {"train": "train", "transfer": "transfer", "self_training_transfer": "self_training"}
RESUME_FLAGS = ("resume", "device", "quiet")  # what --resume may be given: the rest is the run's own


def given_flags(argv: Sequence[str]) -> set[str]:
    """The destinations of the flags written in ``argv`` (abbreviations resolved by argparse)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def check_settings(args: argparse.Namespace) -> None:
    """Every flag's range and the combinations that cannot work, before data is built or
    anything trained: a ``SettingsError`` naming the flag and what it must be."""
    def need(ok: bool, flag: str, rule: str) -> None:
        if not ok:
            raise SettingsError(f"--{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")

    def finite(v) -> bool:
        return v is not None and math.isfinite(v)
    for flag in ("batch-size", "log-every", "mmd-pixels", "feat-dim", "hidden", "heads"):
        need(getattr(args, flag.replace("-", "_")) >= 1, flag, ">= 1")
    for flag in ("iters", "transfer-iters", "self-training-iters", "save-every", "workers"):
        need(getattr(args, flag.replace("-", "_")) >= 0, flag, ">= 0")
    for flag in ("lr", "lr-transfer", "lr-g", "lr-d", "lr-mult", "temperature"):
        need(finite(getattr(args, flag.replace("-", "_"))) and getattr(args, flag.replace("-", "_")) > 0,
             flag, "a finite number > 0")
    for flag in ("alpha", "beta"):
        need(finite(getattr(args, flag)) and getattr(args, flag) >= 0, flag, "a finite number >= 0")
    need(finite(args.unseen_rate) and 0 <= args.unseen_rate <= 1, "unseen-rate", "in [0, 1]")
    need(finite(args.keep) and 0 < args.keep <= 1, "keep", "in (0, 1]")
    need(all(finite(s) and s > 0 for s in args.mmd_sigmas), "mmd-sigmas", "finite numbers > 0")
    if args.pe != "none":
        need(args.pe_dim >= 4 and args.pe_dim % 4 == 0, "pe-dim", "a positive multiple of 4 (sin and cos "
             "along two axes)")
    if args.sim == "multihead":
        need(args.feat_dim % args.heads == 0, "heads", f"a divisor of --feat-dim {args.feat_dim}")
    if args.sim == "none" and args.latent == "sim":
        raise SettingsError("--latent sim needs a SIM to produce z; with --sim none use --latent noise")
    if args.backbone == "small":  # GroupNorm: min(8, c) groups must divide c at widths w / 2 and w
        w = args.small_width
        need(w >= 2 and all(c % min(8, c) == 0 for c in (w // 2, w)), "small-width",
             "an even number up to 8 or a multiple of 16")
    need(args.crop_size >= 8, "crop-size", ">= 8")
    need(all(s >= 8 for s in args.test_sizes), "test-sizes", "sizes >= 8")
    if args.dataset == "shapes":
        need(args.num_train is None or args.num_train >= args.batch_size, "num-train",
             f">= --batch-size ({args.batch_size})")
        counts = args.num_test if isinstance(args.num_test, list) else [args.num_test]
        need(all(n is None or n >= 1 for n in counts) and len(counts) in (1, len(args.test_sizes)), "num-test",
             f"counts >= 1, one for all test sizes or one per size ({len(args.test_sizes)})")
        if args.embeddings:
            raise SettingsError("--embeddings: shapes makes its own seeded word vectors; the flag is for voc, "
                                "context and cocostuff")
    for path in args.embeddings or ():
        if not Path(path).is_file():
            raise SettingsError(f"--embeddings {path}: no such file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out} is a file; expected a run folder")
    parent = next(p for p in [out, *out.parents] if p.exists())  # the folder mkdir would start from
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SettingsError(f"--out {out}: cannot create the run folder ({parent} is not a writable folder)")
    if not args.resume and newest_checkpoint(out):
        raise SettingsError(f"--out {out} already holds a run ({newest_checkpoint(out).name}); continue it with "
                            f"--resume {out}, or choose another folder")


def finished_stage(path: Path) -> dict:
    """--init-from: the checkpoint at the end of a stage; a mid-stage one (--save-every) is refused."""
    ckpt = read_checkpoint(path)
    total = ckpt["args"].get(STAGE_LENGTH.get(ckpt["stage"], ""))
    if total is None or ckpt["iteration"] < total:
        raise SettingsError(f"--init-from {path}: stage {ckpt['stage']} stopped at iteration {ckpt['iteration']} "
                            f"of {total} (a --save-every checkpoint), not at the end of a stage; continue that run "
                            f"with --resume {path.parent}")
    return {**ckpt, "iteration": COMPLETE}


def intact_checkpoint(run_dir: Path) -> dict:
    """--resume: the newest checkpoint of the run that reads; an unreadable newer one is named."""
    if not run_dir.is_dir():
        raise SettingsError(f"--resume {run_dir}: no such run folder")
    saved = checkpoints(run_dir)
    if not saved:
        raise SettingsError(f"--resume {run_dir}: no checkpoint_<stage>.pt in that folder")
    for path in saved:
        try:
            ckpt = read_checkpoint(path)
        except evaluate.CheckpointError as err:
            print(f"note: {err}; trying the one before it", file=sys.stderr)
            continue
        if path != saved[0]:
            print(f"note: resuming from {path.name}, the newest intact checkpoint", file=sys.stderr)
        return ckpt
    raise SettingsError(f"--resume {run_dir}: none of its checkpoints ({', '.join(p.name for p in saved)}) reads")


def settings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, dict | None]:
    """The run's settings, checked, and the checkpoint it continues from (None: from scratch)."""
    args = parser.parse_args(argv)
    resume = None
    if args.resume and args.init_from:
        raise SettingsError("--resume continues a run with its own settings; it cannot be combined with --init-from")
    if args.init_from:  # a finished stage of another run: carry on from it with these settings
        resume = finished_stage(Path(args.init_from))
    if args.resume:  # the interrupted run's own settings, in its own folder
        extra = sorted(given_flags(argv) - set(RESUME_FLAGS))
        if extra:
            raise SettingsError(f"--resume {args.resume} continues that run with its saved settings; drop "
                                f"{', '.join('--' + k.replace('_', '-') for k in extra)} (only --device and "
                                f"--quiet may be given)")
        resume = intact_checkpoint(Path(args.resume))
        args = argparse.Namespace(**{**vars(parser.parse_args([])), **UNSAVED, **resume["args"],
                                     "resume": args.resume, "out": args.resume,
                                     "device": args.device or resume["args"]["device"], "quiet": args.quiet})
    args = resolve(args)
    check_settings(args)
    return args, resume


# ----------------------------------------------------------------------------- main: the run, stage by stage
def one_line(err: Exception) -> str:
    """An error's message; raised in a DataLoader worker, the worker's own message, not its traceback."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    if lines[0].startswith("Caught ") and len(lines) > 1:
        return lines[-1].split(": ", 1)[-1]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=")[0] == "--reproduce" for a in argv):
        return reproduce_main(argv)
    if any(a.split("=")[0] == "--add-classes" for a in argv):
        return add_classes_main(argv)
    try:
        args, resume = settings(get_args_parser(), argv)
        device = evaluate.choose_device(args.device)
    except (SettingsError, evaluate.CheckpointError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if world > 1:
        if args.batch_size % world:
            print(f"train.py: error: --batch-size {args.batch_size} (the global batch) must be divisible by the "
                  f"{world} processes", file=sys.stderr)
            return 2
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        folder = [args.out]  # the default folder names a timestamp: rank 0's, for every rank
        dist.broadcast_object_list(folder, src=0)
        args.out = folder[0]
    try:
        return run_main(args, resume, device, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def mixed_precision(device: torch.device, amp: bool):
    """(dtype, GradScaler, autocast context factory) of --amp: float16 with the scaler on CUDA;
    bfloat16 on the CPU, whose exponent range needs no scaler; float32 without --amp."""
    dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else torch.float32
    return (dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
            lambda: torch.autocast(device.type, dtype=dtype, enabled=amp))


def run_main(args, resume: dict | None, device: torch.device, world: int) -> int:
    """main's work once the settings hold: the benchmark, or the run (every rank of a torchrun)."""
    rank = dist.get_rank() if world > 1 else 0
    args.device = str(device)
    if resume and args.resume and "amp_dtype" not in resume["args"] and device.type != "cuda":
        args.amp = False  # --amp did nothing off CUDA when this run was saved: it goes on in float32
    dtype, scaler, autocast = mixed_precision(device, args.amp)
    args.amp_dtype = str(dtype).removeprefix("torch.")  # what the run used, in config.json
    if args.benchmark is not None:
        return benchmark(args, device)
    if rank == 0:
        print("settings:", json.dumps(vars(args), indent=1))
    out = Path(args.out)
    run = argparse.Namespace(args=args, device=device, out=out, metrics={}, at="building the data", rank=rank,
                             world=world, scaler=scaler, autocast=autocast)
    try:
        train_set, tests, embeddings = build_data(args)
        if args.seen_only:  # M never holds an unseen class's vector
            embeddings = torch.cat([embeddings[:train_set.num_seen], embeddings[train_set.num_seen:] * 0])
        torch.manual_seed(args.seed)
        model = SIGN(embeddings, num_seen=train_set.num_seen, encoder=args.backbone, pretrained=args.pretrained,
                     feat_dim=args.feat_dim, sim=args.sim, pe=args.pe, pe_dim=args.pe_dim, heads=args.heads,
                     hidden=args.hidden, small_width=args.small_width, latent_path=args.latent_path,
                     train_size=(args.crop_size, args.crop_size)).to(device)
        if args.seen_only:  # built whole, then cut: the initial weights are the full run's, so is stage 1
            model = model.first_classes(train_set.num_seen)
        if resume and (differ := architecture_differences(resume["config"], model.config)):
            raise SettingsError(f"{args.init_from or args.resume} holds another model than these settings build "
                                f"({differ}); give the flags it was trained with")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SettingsError(f"--out {out}: cannot create the run folder ({err.strerror})") from None
        if rank == 0:
            (out / "config.json").write_text(json.dumps(vars(args), indent=2, allow_nan=False))
        run.__dict__.update(model=model, train_set=train_set, tests=tests, num_unseen=train_set.num_unseen,
                            class_names=train_set.class_names)
        return train_all(run, resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {run.at}; {resumable(out)}", file=sys.stderr)
        return 130
    except (data.DatasetError, SettingsError, CheckpointWriteError, ValueError) as err:
        if isinstance(err, ValueError) and not isinstance(err, SettingsError) and run.at != "building the data":
            raise  # from inside the training loop a ValueError is a bug: keep its traceback
        where = "" if run.at == "building the data" else f" ({run.at}; {resumable(out)})"
        print(f"train.py: error: {one_line(err)}{where}", file=sys.stderr)
        return 2


def restore(run, resume: dict | None) -> None:
    """A resumed run's weights, metrics and random state, with its ``losses.jsonl`` cut back to the
    checkpoint (the iterations logged after it run again); a new run starts an empty log."""
    model = run.model
    log = run.out / "losses.jsonl"
    if resume:
        model.load_state_dict(resume["model"])
        run.metrics = resume["metrics"]
        torch.set_rng_state(resume["rng"])
        # Drop what the interrupted run logged after its checkpoint; those iterations run again.
        at = (STAGES.index(resume["stage"]), resume["iteration"])
        kept, dropped = [], 0
        for line in log.read_text().splitlines() if log.exists() else []:
            try:  # a run killed while appending leaves a half-written last line
                entry = json.loads(line)
                position = (STAGES.index(entry["stage"]), entry["iteration"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if position < at:
                kept.append(line)
        if dropped and run.rank == 0:
            print(f"note: {log}: dropped {dropped} unreadable line(s), as a run killed mid-write leaves",
                  file=sys.stderr)
        if run.rank == 0:
            log.write_text("".join(f"{line}\n" for line in kept))
    elif run.rank == 0:
        log.unlink(missing_ok=True)


def train_all(run, resume: dict | None) -> int:
    """Stage 1 (SIM + G jointly), stage 2 (transfer), stage 3 (self-training, then transfer again)."""
    args, model = run.args, run.model
    S, U = model.num_seen, run.num_unseen
    plan = [("train", args.iters)] + [("transfer", args.transfer_iters)] * (not args.seen_only)
    if args.self_training != "none" and not args.seen_only:
        plan += [("self_training", args.self_training_iters), ("self_training_transfer", args.transfer_iters)]
    restore(run, resume)
    teacher = None

    def teach(x, y, padding):  # the frozen model after the transfer step pseudo-labels the batch
        with torch.no_grad(), run.autocast():
            probs = teacher(x).float().softmax(1)  # (B, K, H, W)
        return pseudo_labels(probs, y, unseen=range(S, S + U), mode=args.self_training, T=args.temperature,
                             keep=args.keep, padding=padding)  # ST, or AST's Eq. (17) weights

    def sim_and_g(x, y, padding, opts, target=None, weight=None):
        F_x, z, logs = training_step_sim(model, x, y if target is None else target, opts["sim"], run,
                                         weight=weight, seen_only=target is None, padding=padding)
        z = z if args.latent == "sim" else None  # None: G draws z ~ N(0, 1) (ZS3Net)
        return {**logs, **training_step_g(model, F_x, z, y, opts["g"], opts["d"], run)}

    for stage, total in plan:
        done = resume and STAGES.index(stage) < STAGES.index(resume["stage"])
        start = resume["iteration"] if resume and stage == resume["stage"] else 0
        if done or (start >= total and (total > 0 or start > 0)):  # a stage of 0 iterations still evaluates
            if resume and stage == resume["stage"] and stage in EVALUATED_AS and EVALUATED_AS[stage] not in run.metrics:
                # The checkpoint was written before this finished stage's evaluation, which never
                # ended: evaluate now. Its optimisers are not saved again; no later stage reads them.
                evaluate_stage(run, EVALUATED_AS[stage])
                save_checkpoint(run, stage, total, {})
            continue
        if stage.startswith("self_training") and teacher is None:
            if run.world > 1:
                dist.barrier()  # rank 0 has written checkpoint_transfer.pt
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            source = run.out / "checkpoint_transfer.pt"
            teacher.load_state_dict(read_checkpoint(source if source.exists() else Path(args.init_from))["model"])
        run.nets = step_networks(model, run.world, transfer="transfer" in stage)
        if "transfer" in stage:  # E, SIM, G fixed: eval mode (z = mu), only C learns
            opts, poly = transfer_optimizer(model, args)
            def step(x, y, padding):
                target, weight = (y, None) if stage == "transfer" else teach(x, y, padding)
                return transfer_step(model, x, target, opts["c"], run, weight=weight)
        else:
            model.train()
            opts = {"sim": make_optimizer(args.optimizer, sim_step_groups(model, args.lr_mult), args.lr),
                    "g": torch.optim.Adam(model.G.parameters(), lr=args.lr_g),
                    "d": torch.optim.Adam(model.D.parameters(), lr=args.lr_d)}
            poly = [(opts["sim"], args.lr)]
            def step(x, y, padding):
                return sim_and_g(x, y, padding, opts, *((None, None) if stage == "train" else teach(x, y, padding)))
        if start:
            for k, o in opts.items():
                o.load_state_dict(resume["optimizers"][k])
            run.scaler.load_state_dict(resume["scaler"])
        if run.rank == 0:
            print(f"\n== stage {stage}: iterations {start}..{total} ==")
        try:
            run_stage(stage, total, step, poly, run, start,
                      save=lambda i: save_checkpoint(run, stage, i, opts))
        except NonFiniteLoss as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        save_checkpoint(run, stage, total, opts)  # before evaluating: a bad test file loses no training
        if stage in EVALUATED_AS:
            evaluate_stage(run, EVALUATED_AS[stage])
            save_checkpoint(run, stage, total, opts)  # again, now with the stage's metrics
    write_metrics(run)  # also when a resumed run had nothing left to do
    if run.world > 1:
        same_weights_on_every_rank(model)
    if run.rank == 0:
        print_summary(run.metrics)
        print(f"\nrun folder: {run.out} (metrics.json, losses.jsonl, checkpoint_<stage>.pt)")
    return 0


def same_weights_on_every_rank(model: nn.Module) -> None:
    """After a torchrun: every rank must hold the weights rank 0 saved (DDP keeps them in step)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    check = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(len(flat), device=flat.device)).sum()])
    gathered = [torch.zeros_like(check) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, check)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"the ranks' weights differ after training: checksums {[g.tolist() for g in gathered]}")
    if dist.get_rank() == 0:
        print(f"DDP: the {len(gathered)} ranks hold identical weights (checksum {gathered[0][0].item():.6f})")


def print_summary(metrics: dict) -> None:
    print("\nstage           test   seen   unseen  harmonic   (mIoU %)")
    for stage, sets in metrics.items():
        for name, m in sets.items():
            print(f"{stage:<15} {name:<6} {m['seen_miou']:6.2f} {m['unseen_miou']:7.2f} {m['harmonic_miou']:8.2f}")


# ----------------------------------------------------------------------------- --benchmark
def benchmark(args, device: torch.device, warmup: int = 3) -> int:
    """--benchmark: the SIGN step (Eq. 4, then Eqs. 7-8) against a plain DeepLab-v2 step (the same
    E without SIM, C, cross-entropy: Eq. 4 with no SIM is exactly that) on random images and seen
    labels of the preset's batch and crop, interleaved so that both see the same machine state.
    No dataset, no download (random weights). Peak memory: CUDA's max_memory_allocated per step,
    or the process's peak RSS on the CPU."""
    import resource
    K, U = data.CLASS_COUNTS[args.dataset]
    S, B, H = K - U, args.batch_size, args.crop_size
    torch.manual_seed(args.seed)
    table = F.normalize(torch.randn(K, 600), dim=1)  # stands in for the word vectors
    _, scaler, autocast = mixed_precision(device, args.amp)
    run = argparse.Namespace(args=args, device=device, scaler=scaler, autocast=autocast)
    steps = {}
    for name, sim in (("SIGN step (Eq. 4 + Eqs. 7-8)", args.sim), ("DeepLab-v2 step (E -> C -> CE)", "none")):
        model = SIGN(table, num_seen=S, encoder=args.backbone, feat_dim=args.feat_dim, sim=sim, pe=args.pe,
                     pe_dim=args.pe_dim, heads=args.heads, hidden=args.hidden, small_width=args.small_width,
                     latent_path=args.latent_path, train_size=(H, H)).to(device).train()
        opts = {"sim": make_optimizer(args.optimizer, sim_step_groups(model, args.lr_mult), args.lr),
                "g": torch.optim.Adam(model.G.parameters(), lr=args.lr_g),
                "d": torch.optim.Adam(model.D.parameters(), lr=args.lr_d)}

        def step(x, y, model=model, opts=opts, sim=sim):
            F_x, z, _ = training_step_sim(model, x, y, opts["sim"], run)
            if sim != "none":
                training_step_g(model, F_x, z if args.latent == "sim" else None, y, opts["g"], opts["d"], run)
        steps[name] = (step, [], [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(B, 3, H, H, device=device)
    y = torch.randint(0, S, (B, H, H), device=device)
    for i in tqdm(range(warmup + args.benchmark), desc="benchmark", disable=args.quiet):
        for step, times, peaks in steps.values():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            step(x, y)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
                peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
    print(f"benchmark: {args.dataset} preset, {args.backbone}, batch {B}, crop {H}, {device} "
          f"({torch.get_num_threads()} threads), {args.amp_dtype}, {args.benchmark} iterations after {warmup} warm-up")
    seconds = {}
    for name, (_, times, peaks) in steps.items():
        seconds[name] = sum(times) / len(times)
        memory = f", peak {max(peaks) / 2**30:.2f} GiB allocated" if device.type == "cuda" else ""
        print(f"  {name:32s} {B / seconds[name]:8.2f} img/s  {seconds[name]:.3f} s/iteration{memory}")
    sign_s, plain_s = seconds.values()
    print(f"  ratio SIGN / DeepLab-v2 step time: {sign_s / plain_s:.2f}")
    if device.type == "cpu":  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"  peak RSS of the process (both models): {peak:.2f} GiB")
    return 0


# ----------------------------------------------------------------------------- --add-classes
ADD_CLASSES_FLAGS = ("add_classes", "init_from", "save_as", "embeddings", "device", "quiet")


def add_classes_main(argv: Sequence[str]) -> int:
    """``--add-classes NAME ... --init-from CK --save-as NEW.pt [--embeddings F ...]``: M gains a row
    and C an output per name (``SIGN.with_classes``), then the Transfer Learning Step (Eq. 10)
    runs with the checkpoint's own settings and batches, G synthesising the new classes with the
    checkpoint's unseen ones; E, SIM and G stay fixed. The new classes count as unseen."""
    start = time.perf_counter()
    parser = get_args_parser()
    try:
        given, args = given_flags(argv), parser.parse_args(argv)
        if extra := sorted(given - set(ADD_CLASSES_FLAGS)):
            raise SettingsError(f"--add-classes runs with the checkpoint's settings; drop "
                                f"{', '.join('--' + k.replace('_', '-') for k in extra)}")
        if not args.add_classes or not args.init_from or not args.save_as:
            raise SettingsError("--add-classes needs one class name or more, --init-from CHECKPOINT and "
                                "--save-as NEW.pt")
        ckpt = read_checkpoint(Path(args.init_from))
        saved = resolve(argparse.Namespace(**{**vars(parser.parse_args([])), **UNSAVED, **ckpt["args"],
                                              "quiet": args.quiet}))
        device = evaluate.choose_device(args.device)
        saved.device = str(device)
        train_set, _, _ = build_data(saved, tests=False)
        names = ckpt.get("class_names") or train_set.class_names[:ckpt["config"]["num_classes"]]
        known = {n.lower() for n in names}
        twice = {n for n in args.add_classes if [m.lower() for m in args.add_classes].count(n.lower()) > 1}
        if clash := [n for n in args.add_classes if n.lower() in known] + sorted(twice):
            raise SettingsError(f"--add-classes: {', '.join(map(repr, clash))} already in the checkpoint's classes "
                                f"or given twice; it has {', '.join(names)}")
        rows = data.added_class_embeddings(saved.dataset, args.add_classes, args.embeddings or saved.embeddings,
                                           dim=ckpt["config"]["embed_dim"])
    except (SettingsError, evaluate.CheckpointError, data.DatasetError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    model = SIGN.from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    # C's new rows as a fresh model of the new size, seeded as the run was, draws them: for a
    # --seen-only checkpoint given its dataset's unseen names, the rows the full run starts from
    torch.manual_seed(saved.seed)
    model = model.with_classes(rows).to(device)  # (K + n classes): the new ones after the unseen
    run = argparse.Namespace(args=saved, device=device, out=None, model=model, train_set=train_set, metrics={},
                             num_unseen=len(names) + len(rows) - model.num_seen, class_names=names + args.add_classes,
                             at="the transfer step")
    _, run.scaler, run.autocast = mixed_precision(device, False)
    opts, poly = transfer_optimizer(model, saved)
    run_stage("transfer", saved.transfer_iters, lambda x, y, padding: transfer_step(model, x, y, opts["c"], run),
              poly, run)
    save_checkpoint(run, "transfer", saved.transfer_iters, opts, path=Path(args.save_as))
    span = f"class {len(names)}" if len(rows) == 1 else f"classes {len(names)}-{len(run.class_names) - 1}"
    print(f"added {', '.join(args.add_classes)} (unseen, {span}) and "
          f"re-fitted C in {saved.transfer_iters} transfer iterations: {args.save_as}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


# ----------------------------------------------------------------------------- the paper's tables on shapes
# name -> (train.py flags, the run whose end-of-transfer checkpoint it starts from). A run that
# only adds self-training starts from its base run's checkpoint_transfer.pt instead of retraining.
BASELINES = {"zs3net": ["--sim", "none", "--latent", "noise"],  # no SIM, z ~ N(0, 1): ZS3Net
             "cagnet": ["--sim", "attention", "--pe", "none"],  # contextual latent, no PE: CaGNet
             "sign": []}  # the defaults: multi-head SIM, RPE
NO_ST = ["--self-training", "none"]
EXPERIMENTS = {**{name: (flags + NO_ST, None) for name, flags in BASELINES.items()},
               **{f"sim-{a}": (["--sim", a] + NO_ST, None) for a in ("conv", "attention", "self-attention")},
               **{f"pe-{p}": (["--pe", p] + NO_ST, None) for p in ("none", "ape", "ape-interp")},
               **{f"{name}-st": (flags + ["--self-training", "st"], name) for name, flags in BASELINES.items()},
               **{f"sign-ast-T{t:g}": (["--self-training", "ast", "--temperature", str(t)], "sign")
                  for t in evaluate.TEMPERATURES}}
CLAIMED = ["sign", "zs3net", "pe-ape", "sign-st", "sign-ast-T2"]  # the runs evaluate.CLAIMS compares
RESERVED = ("--seed", "--out", "--resume", "--init-from", "--self-training", "--temperature", "--quiet",
            "--reproduce", "--seeds", "--experiments", "--jobs")
UNCOMPARED = ("out", "resume", "init_from", "device", "quiet")  # may differ between a run and its rerun


def reproduce(root, seeds: Sequence[int], train_args: Sequence[str] = (), *, names: Sequence[str] | None = None,
              jobs: int = 1) -> list[str]:
    """Every run of EXPERIMENTS (or of ``names`` and their base runs) for every seed, as
    ``root/<name>/seed<k>``: ``jobs`` ``python train.py`` processes at a time, each with
    cores // jobs threads and its log in ``train.log``; base runs first, then the runs that
    start from them. A run whose metrics.json holds its final stage is kept, one with a
    checkpoint resumes, but only if its config.json matches these settings (else a
    ValueError names the differences). A failing run does not stop the others; returns the
    folders of the runs that failed."""
    root = Path(root).resolve()  # absolute: --init-from paths are stored in config.json
    reserved = [a for a in train_args if a.split("=")[0] in RESERVED]
    if reserved:
        raise ValueError(f"--reproduce sets {reserved} itself; remove them")
    names = list(EXPERIMENTS) if names is None else list(names)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"--experiments: unknown {unknown}; expected names from {list(EXPERIMENTS)}")
    names += [EXPERIMENTS[n][1] for n in names if EXPERIMENTS[n][1] and EXPERIMENTS[n][1] not in names]
    waves = [[], []]  # base runs, then the runs that start from their checkpoint_transfer.pt
    for seed in seeds:
        for name in [n for n in EXPERIMENTS if n in names]:
            flags, base = EXPERIMENTS[name]
            out = root / name / f"seed{seed}"
            argv = [*flags, *train_args, "--seed", str(seed), "--out", str(out), "--quiet"]
            if base:
                argv += ["--init-from", str(root / base / f"seed{seed}" / "checkpoint_transfer.pt")]
            if (out / "config.json").is_file():
                _check_same_settings(out, resolve(get_args_parser().parse_args(argv)))
                if ("self_training" if base else "transfer") in evaluate.read_metrics(out):
                    continue
            if list(out.glob("checkpoint_*.pt")):
                argv = ["--resume", str(out), "--quiet"]
            waves[bool(base)].append((f"{name}, seed {seed}", out, argv))
    total, finished, failed = sum(map(len, waves)), itertools.count(1), []
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    print(f"reproduce: {total} runs into {root}, {jobs} at a time, {threads} thread(s) each", flush=True)

    def run(job) -> None:
        label, out, argv = job
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out / "train.log", "a") as log:
            code = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": threads}).returncode
        status = "done" if code == 0 else f"FAILED (exit {code}; see {out / 'train.log'})"
        print(f"[{next(finished)}/{total}] {label}: {status} in {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(str(out))

    with ThreadPoolExecutor(jobs) as pool:
        for wave in waves:
            list(pool.map(run, wave))
    return failed


def _check_same_settings(run_dir: Path, expected) -> None:
    # a key an older config.json lacks had the value the code then used: the current default, or UNSAVED's
    saved = {**vars(get_args_parser().parse_args([])), **UNSAVED, **json.loads((run_dir / "config.json").read_text())}
    differ = {k: (saved.get(k), v) for k, v in vars(expected).items() if k not in UNCOMPARED and saved.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"run {run_dir} was made with other settings ({listed}); "
                         f"delete it or reproduce into another folder")


def reproduce_main(argv: list[str]) -> int:
    """``python train.py --reproduce DIR [--seeds ...] [--experiments ...] [--jobs N] [train.py flags]``:
    the runs, then ``DIR/tables.md`` (``evaluate.reproduction_tables``), and the wall time."""
    p = argparse.ArgumentParser(prog="train.py --reproduce", allow_abbrev=False,  # --seed must not mean --seeds
                                description="Run the paper's experiments on shapes (train.EXPERIMENTS) and "
                                "tabulate them; other flags go to every run.")
    p.add_argument("--reproduce", type=Path, required=True, metavar="DIR", help="run folders DIR/<name>/seed<k>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--experiments", nargs="+", metavar="NAME", help="only these runs (and the runs they start "
                   f"from); 'claimed' = {' '.join(CLAIMED)}; default: all of train.EXPERIMENTS")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs at a time; default: 2 on two or more cores, else 1")
    args, train_args = p.parse_known_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    names = None if args.experiments is None else [
        n for e in args.experiments for n in (CLAIMED if e == "claimed" else [e])]
    start = time.perf_counter()
    try:
        if args.reproduce.exists() and not args.reproduce.is_dir():
            raise ValueError(f"--reproduce {args.reproduce} is a file; expected the folder of the runs")
        # a bad flag or value fails here, once, before any run starts
        check_settings(resolve(get_args_parser().parse_args([*train_args, "--out", str(args.reproduce / "_")])))
        failed = reproduce(args.reproduce, args.seeds, train_args, names=names, jobs=args.jobs)
        tables = evaluate.reproduction_tables(args.reproduce)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches the runs too: each keeps its last checkpoint
        print(f"\ninterrupted: finished runs are kept and interrupted ones resume from their last checkpoint; "
              f"continue with the same --reproduce {args.reproduce} command", file=sys.stderr)
        return 130
    (args.reproduce / "tables.md").write_text(tables + "\n")
    print(tables + f"\n\nwritten to {args.reproduce / 'tables.md'}; wall time {time.perf_counter() - start:.0f} s")
    if failed:
        print("train.py: these runs failed and are missing from the tables:\n  " + "\n  ".join(failed),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
