"""Train SIGN (Cheng et al., ICCV 2021): the paper's algorithm first, then the run around it.

``python train.py`` runs the whole method on the built-in ``shapes`` benchmark on a CPU in minutes;
``python train.py --dataset voc --data-root DIR --embeddings w2v.bin ft.vec`` runs it with the
paper's settings, and ``torchrun --nproc_per_node N train.py ...`` on N GPUs.

Reading order (the paper's sections 3.2 and 3.4, then the plumbing)
    training_step_sim    Training Step (SIM), Eq. (4): E, SIM and C on real seen labels
    training_step_g      Training Step (G), Eqs. (7)-(8): D, then G, on SIM's fixed features
    random_label_map     y^ of Eq. (9): a label map in which unseen classes stand
    transfer_step        Transfer Learning Step, Eqs. (9)-(10): C on real and synthetic features
    teach                self-training: the frozen teacher's pseudo-labels, weighted by Eq. (17)
    train_all            the stages: train (SIM and G jointly), transfer, self_training, transfer again
    Run, make_optimizers, run_stage, save_checkpoint, get_args_parser, main: the run around them
    benchmark, add_classes_main, reproduce: --benchmark, --add-classes, --reproduce

Symbols: x image, y label map (255 = ignore), F_x = SIM's features, z SIM's latent,
F^_x = G(M(y) (+) z) synthetic features, alpha / beta the loss weights of Eqs. (4) / (8),
T the AST temperature of Eq. (17). Where this departs from the paper, and why: README "Deviations".
"""
import argparse
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

import data
import evaluate
from ast_weights import pseudo_labels
from mmd import DEFAULT_SIGMAS
from sign import SIGN, discriminator_loss, generator_loss, resize_labels, sim_step_loss, transfer_loss

PRESETS = {  # defaults per dataset; every flag below can override them
    "shapes": dict(backbone="small", small_width=64, feat_dim=64, pe_dim=32, heads=4, hidden=128,
                   optimizer="adam", lr=3e-3, lr_transfer=1e-3, lr_g=1e-3, lr_d=1e-3, alpha=10.0, beta=50.0,
                   crop_size=64, batch_size=8, iters=2000, transfer_iters=400, self_training_iters=400,
                   temperature=2.0, unseen_rate=0.5, mmd_pixels=64, test_sizes=[64, 128], workers=0, lr_mult=1.0,
                   num_test=[2000, 300], pretrained=False, warmup=200, clip_grad=1.0),
    "voc": dict(backbone="resnet101", small_width=64, feat_dim=600, pe_dim=600, heads=8, hidden=256,
                optimizer="sgd", lr=2.5e-4, lr_transfer=2.5e-4, lr_g=2e-4, lr_d=2.5e-4, alpha=100.0, beta=50.0,
                crop_size=368, batch_size=8, iters=40000, transfer_iters=6000, self_training_iters=6000,
                temperature=2.0, unseen_rate=0.5, mmd_pixels=256, test_sizes=[513], workers=4, lr_mult=10.0,
                num_test=None, pretrained=True, warmup=0, clip_grad=0.0),
}
PRESETS["context"] = dict(PRESETS["voc"], transfer_iters=10000, self_training_iters=10000)
PRESETS["cocostuff"] = dict(PRESETS["voc"], transfer_iters=10000, self_training_iters=10000)
STAGES = ("train", "transfer", "self_training", "self_training_transfer")
STAGE_LENGTH = {"train": "iters", "transfer": "transfer_iters", "self_training": "self_training_iters",
                "self_training_transfer": "transfer_iters"}  # the flag that sets a stage's iterations
EVALUATED_AS = {"train": "train", "transfer": "transfer", "self_training_transfer": "self_training"}


# ----------------------------------------------------------------------------- the algorithm
def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  clip: float = 0.0) -> None:
    """One update; ``clip`` > 0 caps the gradient's norm over the optimiser's parameters first."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    scaler.step(optimizer)


def training_step_sim(run: "Run", x, y, opt, *, weight=None, seen_only=True, padding=None):
    """Training Step (SIM), Eq. (4): L_pred^train + alpha L_KLD for E, SIM and C. Returns SIM's outputs,
    detached, for Training Step (G), and the losses. Self-training passes pseudo-labels with their ``weight``
    over all classes (``seen_only`` off, Eq. 3). Eq. (2) averages over the image, not the crop's ``padding``."""
    with run.autocast():
        logits, F_x, z, mu, logvar = run.nets.sim(x)  # Eq. (1): F_x, z = SIM(E(x) (+) PE); C(F_x)
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        inside = None if padding is None else resize_labels(padding.long(), F_x.shape[-2:]) == 0  # (B, h, w)
        loss, logs = sim_step_loss(logits, y, mu, logvar, num_seen=run.model.num_seen if seen_only else None,
                                   alpha=run.args.alpha, weight=weight, kl_mask=inside)  # Eq. (4)
    backward_step(loss, opt, run.scaler, run.args.clip_grad)
    return F_x.detach(), None if z is None else z.detach(), {"sim": loss.detach(), **logs}


def training_step_g(run: "Run", F_x, z, y, opt_g, opt_d):
    """Training Step (G), Eqs. (7)-(8): D maximises L_adv, G minimises L_adv + beta L_MMD. E and SIM are fixed
    (F_x, z detached); z is None without SIM or with ``--latent noise`` (ZS3Net): G draws z ~ N(0, 1)."""
    args, model = run.args, run.model
    with run.autocast():
        y = resize_labels(y, F_x.shape[-2:])  # (B, h, w)
        if z is None:
            z = torch.randn(len(y), model.latent_dim, *y.shape[-2:], device=y.device)  # (B, L, h, w)
        fake = run.nets.G(y, z)  # F^_x = G(M(y) (+) z), (B, F, h, w)
        d_loss = discriminator_loss(run.nets.D, F_x, fake, y)  # Eq. (7), max over D
    backward_step(d_loss, opt_d, run.scaler)
    with run.autocast():  # G plays against the D just updated, as in alternating GAN training
        g_loss, logs = generator_loss(model.D, F_x, fake, y, model.seen_classes, beta=args.beta,
                                      sigmas=args.mmd_sigmas, max_per_class=args.mmd_pixels)  # Eq. (8)
    backward_step(g_loss, opt_g, run.scaler)
    return {"d": d_loss.detach(), "g": g_loss.detach(), **logs}


def random_label_map(B: int, h: int, w: int, *, num_seen: int, num_unseen: int, unseen_rate: float,
                     device: torch.device) -> torch.Tensor:
    """y^ of Eq. (9), (B, h, w): each pixel unseen with probability ``unseen_rate``, else seen."""
    seen = torch.randint(0, num_seen, (B, h, w), device=device)
    unseen = torch.randint(num_seen, num_seen + num_unseen, (B, h, w), device=device)
    return torch.where(torch.rand(B, h, w, device=device) < unseen_rate, unseen, seen)


def transfer_step(run: "Run", x, y, opt_c, *, weight=None):
    """Transfer Learning Step, Eqs. (9)-(10): C on real features and G's synthetic ones. E, SIM and G are
    fixed in eval mode (z = mu for the real features, z ~ N(0, 1) for the synthetic ones); ``y`` may hold
    self-training pseudo-labels with per-pixel ``weight``."""
    model = run.model
    with torch.no_grad(), run.autocast():
        F_x = model.features(x)[0]  # (B, F, h, w)
        B, _, h, w = F_x.shape
        y_hat = random_label_map(B, h, w, num_seen=model.num_seen, num_unseen=run.num_unseen,
                                 unseen_rate=run.args.unseen_rate, device=x.device)
        fake = model.generate(y_hat)  # F^_x = G(M(y^) (+) z), z ~ N(0, 1)
    if weight is not None:
        weight = F.interpolate(weight[:, None], size=(h, w), mode="nearest")[:, 0]  # as resize_labels
    with run.autocast():
        loss, logs = transfer_loss(run.nets.C, F_x, resize_labels(y, (h, w)), fake, y_hat, weight=weight)  # Eq. (10)
    backward_step(loss, opt_c, run.scaler)
    return {"transfer": loss.detach(), **logs}


def teach(run: "Run", teacher: SIGN, x, y, padding):
    """Self-training: the frozen model after the transfer step labels the batch's unlabelled
    pixels (never the crop's padding) with unseen classes: ST keeps its top ``--keep`` per class,
    AST keeps all with Eq. (17)'s weights. Returns (target, weight), (B, H, W) each."""
    S, args = run.model.num_seen, run.args
    with torch.no_grad(), run.autocast():
        probs = teacher(x).float().softmax(1)  # (B, K, H, W)
    return pseudo_labels(probs, y, unseen=range(S, S + run.num_unseen), mode=args.self_training,
                         T=args.temperature, keep=args.keep, padding=padding)  # Eq. (17)


def train_all(run: "Run", resume: dict | None) -> int:
    """Stage 1 trains SIM and G jointly ("we jointly optimize them": Eq. 4, then Eqs. 7-8, every
    iteration); stage 2 is the Transfer Learning Step; stage 3 fine-tunes E, SIM and C on the
    teacher's pseudo-labels (D and G follow on the real seen labels), then runs the transfer step
    again with them. Each stage ends with a checkpoint and the test sets' scores."""
    args, model = run.args, run.model
    plan = STAGES[:1] if args.seen_only else STAGES[:2] if args.self_training == "none" else STAGES
    restore(run, resume)
    if resume and not args.resume:  # --init-from: the run keeps what it starts from (its teacher) in its folder
        save_checkpoint(run, resume["stage"], resume["iteration"], {})
    resumed, teacher = STAGES.index(resume["stage"]) if resume else -1, None
    for here, stage in enumerate(plan):
        total = getattr(args, STAGE_LENGTH[stage])
        start = resume["iteration"] if args.resume and here == resumed else 0
        if here < resumed or (here == resumed and (not args.resume or 0 < total <= start)):  # finished
            if here == resumed and stage in EVALUATED_AS and EVALUATED_AS[stage] not in run.metrics:
                evaluate_stage(run, EVALUATED_AS[stage])  # saved before its evaluation ended: evaluate now
                save_checkpoint(run, stage, total, {})  # no later stage reads this stage's optimisers
            continue
        if stage.startswith("self_training") and teacher is None:
            if run.world > 1:
                dist.barrier()  # rank 0 has written checkpoint_transfer.pt
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            teacher.load_state_dict(read_checkpoint(run.out / "checkpoint_transfer.pt", args.run_id)["model"])
        transfer = "transfer" in stage
        run.nets = step_networks(model, run.world, transfer=transfer)
        opts = make_optimizers(model, args, transfer=transfer)

        def step(x, y, padding):
            target, weight = (y, None) if stage in ("train", "transfer") else teach(run, teacher, x, y, padding)
            if transfer:
                return transfer_step(run, x, target, opts["c"], weight=weight)
            F_x, z, logs = training_step_sim(run, x, target, opts["sim"], weight=weight,
                                             seen_only=stage == "train", padding=padding)
            z = z if args.latent == "sim" else None  # None: G draws z ~ N(0, 1) (ZS3Net)
            return {**logs, **training_step_g(run, F_x, z, y, opts["g"], opts["d"])}
        if start:
            for k, o in opts.items():
                o.load_state_dict(resume["optimizers"][k])
            run.scaler.load_state_dict(resume["scaler"])
        if run.rank == 0:
            print(f"\n== stage {stage}: iterations {start}..{total} ==")
        run_stage(run, stage, total, step, opts, start)
        save_checkpoint(run, stage, total, opts)  # before evaluating: a bad test file loses no training
        if stage in EVALUATED_AS:
            evaluate_stage(run, EVALUATED_AS[stage])
            save_checkpoint(run, stage, total, opts)  # again, now with the stage's metrics
    write_metrics(run)  # also when a resumed run had nothing left to do
    if run.world > 1:
        same_weights_on_every_rank(model)
    if run.rank == 0:
        print("\nstage           test   seen   unseen  harmonic   (mIoU %)")
        for stage, sets in run.metrics.items():
            for name, m in sets.items():
                print(f"{stage:<15} {name:<6} {m['seen_miou']:6.2f} {m['unseen_miou']:7.2f} {m['harmonic_miou']:8.2f}")
        print(f"\nrun folder: {run.out} (metrics.json, losses.jsonl, checkpoint_<stage>.pt)")
    return 0


# ----------------------------------------------------------------------------- what a run holds, what each step trains
class Segmenter(nn.Module):
    """E, SIM and C, what Eq. (4) trains: x -> (C(F_x), F_x, z, mu, logvar)."""
    def __init__(self, model: SIGN):
        super().__init__()
        self.E, self.SIM, self.C = model.E, model.SIM, model.C

    def forward(self, x: torch.Tensor):
        f = self.E(x)  # (B, F, h, w)
        F_x, z, mu, logvar = (f, None, None, None) if self.SIM is None else self.SIM(f)  # Eq. (1)
        return self.C(F_x), F_x, z, mu, logvar  # (B, K, h, w), then SIM's outputs


class Synthesis(nn.Module):
    """M and G, what Eq. (8) trains: (y, z) -> F^_x = G(M(y) (+) z); z detached (SIM learns from Eq. 4)."""
    def __init__(self, model: SIGN):
        super().__init__()
        self.M, self.G = model.M, model.G

    def forward(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # (B, h, w), (B, L, h, w)
        return self.G.from_table(self.M.table, self.M.rows(labels), z.detach())  # (B, F, h, w)


@dataclass
class StepNets:
    """What each step trains: E + SIM + C for Eq. (4), M + G for Eq. (8), D for Eq. (7), C for Eq. (10)."""
    sim: nn.Module
    G: nn.Module
    D: nn.Module
    C: nn.Module


def step_networks(model: SIGN, world: int = 1, *, transfer: bool = False) -> StepNets:
    """With ``world`` > 1 the networks the stage trains are wrapped in DistributedDataParallel, which
    averages exactly their gradients; the detaches in sign.py's losses decide which network a loss
    reaches (D's side of Eq. 8 is called unwrapped), so a wrapper averages only its own step's gradients."""
    def wrap(module: nn.Module, trained: bool) -> nn.Module:
        return DistributedDataParallel(module) if world > 1 and trained else module
    return StepNets(sim=wrap(Segmenter(model), not transfer), G=wrap(Synthesis(model), not transfer),
                    D=wrap(model.D, not transfer), C=wrap(model.C, transfer))


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype:
    """--amp: float16 on CUDA, with a GradScaler; bfloat16 on the CPU, whose exponent range needs none."""
    return (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else torch.float32


@dataclass
class Run:
    """What one training process holds; ``nets``: what the current stage's steps train (``step_networks``)."""
    args: argparse.Namespace
    device: torch.device
    model: SIGN
    class_names: list[str] = field(default_factory=list)
    train_set: torch.utils.data.Dataset | None = None
    tests: dict | None = None
    out: Path | None = None  # the run folder; --add-classes and --benchmark write none
    rank: int = 0
    world: int = 1
    metrics: dict = field(default_factory=dict)
    at: str = "starting"  # where the run is, for the message of an interruption or a failure
    nets: StepNets = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)
    dtype: torch.dtype = field(init=False)

    def __post_init__(self):
        self.nets = step_networks(self.model)
        self.dtype = amp_dtype(self.device, self.args.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):  # the losses themselves stay float32 (sign.py)
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.args.amp)

    @property
    def num_unseen(self) -> int:
        return self.model.config["num_classes"] - self.model.num_seen


def make_optimizers(model: SIGN, args, *, transfer: bool) -> dict[str, torch.optim.Optimizer]:
    """A stage's optimisers: C's alone in the transfer steps (E, SIM, G fixed in eval mode: z = mu), else E + SIM
    + C's and the paper's Adam for G and D. E + SIM + C (or C): the paper's SGD (section 4.2) or Adam, in
    DeepLab-v2's groups: the backbone (ResNet body, or all of the small encoder) at the base rate, the new layers
    (ASPP, SIM, C) at ``lr_mult`` times it for weights, twice that for biases without weight decay."""
    model.train(not transfer)
    parts = ([], [model.C]) if transfer else ([getattr(model.E, "body", model.E)],
                                              [getattr(model.E, "aspp", None), model.SIM, model.C])
    base, new = ([(n, p) for m in ms if m is not None for n, p in m.named_parameters() if p.requires_grad]
                 for ms in parts)
    groups = [dict(params=[p for _, p in base + new], lr_mult=1.0)] if args.lr_mult == 1 else [
        dict(params=[p for _, p in base], lr_mult=1.0),
        dict(params=[p for n, p in new if not n.endswith("bias")], lr_mult=args.lr_mult),
        dict(params=[p for n, p in new if n.endswith("bias")], lr_mult=2 * args.lr_mult, weight_decay=0.0)]
    lr = args.lr_transfer if transfer else args.lr
    groups = [dict(g, lr=lr * g["lr_mult"]) for g in groups if g["params"]]
    first = (torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4) if args.optimizer == "sgd"
             else torch.optim.Adam(groups, lr=lr))
    if transfer:
        return {"c": first}
    return {"sim": first, "g": torch.optim.Adam(model.G.parameters(), lr=args.lr_g),
            "d": torch.optim.Adam(model.D.parameters(), lr=args.lr_d)}


def poly_schedule(optimizer: torch.optim.Optimizer, total: int, start: int = 0,
                  warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """DeepLab's poly schedule (section 4.2), every group at its first rate x (1 - i / total)^0.9 from
    ``start``, after a linear ramp over the first ``warmup`` iterations; in closed form: PolynomialLR's
    step-by-step product would make a resumed run differ."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / (warmup + 1)) * (1 - i / max(total, 1)) ** 0.9, last_epoch=start - 1)


# ----------------------------------------------------------------------------- the loop
def iteration_seed(seed: int, stage: str, iteration: int) -> int:
    return (seed * 1000003 + STAGES.index(stage) * 100003 + iteration) % 2**63


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's own seed (rank 0 keeps ``seed``), far from every other iteration's seed."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**63


class SeededItems(torch.utils.data.Dataset):
    """``dataset[i]`` drawn after seeding torch from the ``(i, seed)`` the sampler hands over: in a loader
    worker, an item's augmentation is then a function of (seed, stage, epoch, index) alone."""
    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]):
        torch.manual_seed(key[1])
        return self.dataset[key[0]]


def batch_stream(dataset, args, stage: str, start: int, device: torch.device, rank: int = 0, world: int = 1):
    """Endless training batches (x, y, padding). Epoch e's order is a permutation seeded by (seed, stage, e),
    so a resumed run replays exactly the batches and augmentations it would have drawn; each rank takes its
    slice of every global batch. ``padding`` (B, H, W) marks the crop's padding, ignore (255) in y."""
    B = args.batch_size
    per_epoch = len(dataset) // B
    if per_epoch == 0:
        raise SettingsError(f"--batch-size {B} is larger than the training set ({len(dataset)} images)")
    it = start
    while True:
        seed = iteration_seed(args.seed, stage, -1 - it // per_epoch)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(dataset), generator=g)[: per_epoch * B].view(per_epoch, B)
        order = order[:, rank * B // world:(rank + 1) * B // world]  # this rank's slice of every global batch
        if rank:  # the loader's augmentation seeds come from g: each rank its own
            g = torch.Generator().manual_seed(rank_seed(seed, rank))
        batches, items = order[it % per_epoch:].tolist(), dataset
        if args.workers:  # a worker's stream depends on which batches it took before: seed each item instead
            batches, items = [[(i, iteration_seed(seed, stage, i)) for i in b] for b in batches], SeededItems(dataset)
        # The loader's own generator: its iterator draws a seed, which must not shift the global stream
        loader = DataLoader(items, batch_sampler=batches, generator=g, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        for x, y in loader:
            padding = y == data.PADDING  # (B, H, W): outside the image, never pseudo-labelled
            y = y.masked_fill(padding, data.IGNORE)
            yield (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                   padding.to(device, non_blocking=True))
            it += 1


def run_stage(run: Run, stage: str, total: int, step, optimizers: dict, start: int = 0) -> None:
    """Iterations ``start..total-1`` of a stage: reseed, ``step(x, y, padding) -> losses``, stop on a loss
    that is not finite on any rank (through the averaged gradients it reaches all), follow the poly schedule,
    log to losses.jsonl, checkpoint the run folder every --save-every."""
    args = run.args
    batches = batch_stream(run.train_set, args, stage, start, run.device, run.rank, run.world)
    poly = poly_schedule(next(iter(optimizers.values())), total, start,  # C's, or E + SIM + C's
                         args.warmup if stage == "train" else 0)
    bar = tqdm(range(start, total), desc=stage, dynamic_ncols=True, disable=args.quiet or run.rank > 0)
    for i in bar:
        run.at = f"stage {stage}, iteration {i}"
        torch.manual_seed(rank_seed(iteration_seed(args.seed, stage, i), run.rank))
        x, y, padding = next(batches)
        logs = step(x, y, padding)
        bad = next((k for k, v in logs.items() if not torch.isfinite(v).all()), None)
        if run.world > 1:
            everywhere = torch.tensor(float(bad is None), device=run.device)
            dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
            bad = bad or ("on another rank" if everywhere.item() < 1 else None)
        if bad:
            value = f" = {logs[bad].item()}" if bad in logs else ""
            hint = "; --clip-grad 1 caps Eq. (4)'s step" if bad in ("sim", "pred", "kld") and not args.clip_grad else ""
            raise FloatingPointError(f"non-finite loss {bad}{value} at {run.at}; nothing was saved for this "
                                     f"iteration{hint}")
        run.scaler.update()
        poly.step()
        if i % args.log_every == 0 or i == total - 1:
            logs = {k: round(v.item(), 5) for k, v in logs.items()}
            bar.set_postfix(logs, refresh=False)
            if run.out and run.rank == 0:
                try:
                    with open(run.out / "losses.jsonl", "a") as f:
                        f.write(json.dumps({"stage": stage, "iteration": i, **logs}) + "\n")
                except OSError as err:  # a full disk's error names no file
                    raise OSError(f"cannot append to {run.out / 'losses.jsonl'}: {err.strerror or err}") from err
        if run.out and args.save_every and (i + 1) % args.save_every == 0 and i + 1 < total:
            save_checkpoint(run, stage, i + 1, optimizers)


def same_weights_on_every_rank(model: nn.Module) -> None:
    """After a torchrun, every rank must hold the weights rank 0 saved (DDP keeps them in step)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    check = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(len(flat), device=flat.device)).sum()])
    gathered = [torch.zeros_like(check) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, check)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"the ranks' weights differ after training: checksums {[g.tolist() for g in gathered]}")
    if dist.get_rank() == 0:
        print(f"DDP: the {len(gathered)} ranks hold identical weights (checksum {gathered[0][0].item():.6f})")


# ----------------------------------------------------------------------------- data, scores, checkpoints
def build_data(args, tests: bool = True):
    """Training set (--unseen-images applied), test sets by name (None with ``tests=False``), the
    class-embedding table behind M, and how many training images each --unseen-images choice keeps."""
    tests = evaluate.test_sets(args.dataset, root=args.data_root, sizes=args.test_sizes, eval_res=args.eval_res,
                               num_images=args.num_test, layout=args.layout) if tests else None
    if args.dataset == "shapes":  # the benchmark itself is fixed (scene seed 0); --seed varies training
        train_set = data.Shapes("train", size=args.crop_size, num_images=args.num_train, layout=args.layout)
        embeddings = data.shapes_embeddings(train_set.class_names)
    else:
        train_set = data.build_dataset(args.dataset, "train", root=args.data_root,
                                       transform=data.train_transform(args.crop_size))
        if not args.embeddings:
            raise data.EmbeddingError(f"--embeddings is required for {args.dataset}: the word2vec .bin and fastText "
                                      f".vec files, or a .npy table (README 'Datasets')")
        embeddings = data.load_class_embeddings(args.embeddings, train_set.class_names, raw_ids=train_set.raw_ids,
                                                order=args.embeddings_order)
    return train_set, tests, embeddings, train_set.choose_images(args.unseen_images, quiet=args.quiet)


def evaluate_stage(run: Run, stage: str) -> None:
    """Score every test set (tables printed) into metrics.json."""
    run.at = f"evaluating after stage {stage}"
    run.metrics[stage] = evaluate.evaluate_sets(
        run.model, run.tests, class_names=run.train_set.class_names, num_seen=run.model.num_seen, device=run.device,
        eval_res=run.args.eval_res, batch_size=run.args.batch_size, workers=run.args.workers,
        quiet=run.args.quiet, title=stage)
    write_metrics(run)


def write_metrics(run: Run) -> None:
    if run.rank == 0:  # atomically: evaluate.py --tables never reads half a file
        write_atomically(run.out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(run.metrics, indent=2)))


def save_checkpoint(run: Run, stage: str, iteration: int, optimizers: dict, path: Path | None = None) -> None:
    """Everything needed to continue or evaluate, to ``path`` (default: the run folder's
    ``checkpoint_<stage>.pt``). Rank 0 alone."""
    if run.rank:
        return
    state = {"model": run.model.state_dict(), "config": run.model.config, "args": vars(run.args),
             "stage": stage, "iteration": iteration, "metrics": run.metrics,
             "class_names": run.class_names[:run.model.config["num_classes"]],
             "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
             "scaler": run.scaler.state_dict(), "rng": torch.get_rng_state()}
    path = path or run.out / f"checkpoint_{stage}.pt"
    run.at = f"writing {path.name} at stage {stage}, iteration {iteration}"
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def write_atomically(path: Path, write) -> None:
    """``write(tmp)``, then rename it to ``path``: a reader never sees half a file, and a failed or
    interrupted write removes its temporary file and leaves the previous ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, Exception):  # Ctrl-C
            raise
        free = shutil.disk_usage(path.parent).free  # torch.save reports a full disk without an errno
        why = ("no space left on the device" if getattr(err, "errno", None) == errno.ENOSPC or free < 2**20
               else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
        raise OSError(f"cannot write {path}: {why} ({free / 2**20:.0f} MiB free)") from err


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, the latest stage first."""
    return [p for p in (run_dir / f"checkpoint_{s}.pt" for s in reversed(STAGES)) if p.is_file()]


def read_checkpoint(path: Path, run_id: str | None = None) -> dict:
    """A checkpoint this module wrote, with what continuing from it needs (and, given ``run_id``, of that run)."""
    ckpt = evaluate.read_checkpoint(path, keys=("model", "config", "args", "stage", "iteration", "metrics"))
    if run_id and ckpt["args"].get("run_id") != run_id:
        raise SettingsError(f"{path} belongs to another run (run_id {ckpt['args'].get('run_id')}, not {run_id}): "
                            "the folder mixes two runs")
    return ckpt


def restore(run: Run, resume: dict | None) -> None:
    """The weights, metrics and random state the run starts from. --resume cuts ``losses.jsonl``
    back to the checkpoint (later iterations run again); a new run starts an empty log."""
    log = run.out / "losses.jsonl"
    if resume:
        run.model.load_state_dict(resume["model"])
        run.metrics = resume["metrics"]
        torch.set_rng_state(resume["rng"])
    if run.rank:
        return
    if not (resume and run.args.resume):
        log.unlink(missing_ok=True)
        return
    at, kept, dropped = (STAGES.index(resume["stage"]), resume["iteration"]), [], 0
    if not log.exists():
        print(f"note: {log} is missing: the log starts again at stage {resume['stage']}, iteration "
              f"{resume['iteration']}", file=sys.stderr)
    for line in log.read_text().splitlines() if log.exists() else []:
        try:  # a run killed while appending leaves a half-written last line
            entry = json.loads(line)
            if (STAGES.index(entry["stage"]), entry["iteration"]) < at:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            dropped += 1
    if dropped:
        print(f"note: {log}: dropped {dropped} unreadable line(s), as a run killed mid-write leaves", file=sys.stderr)
    log.write_text("".join(f"{line}\n" for line in kept))


# ----------------------------------------------------------------------------- flags
class SettingsError(ValueError):
    """A flag out of its range or at odds with another: one line naming it, before any work."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, caught by main (exit 2), not usage + exit
        raise SettingsError(message)


def ranged(kind: type, ok, rule: str):
    """An argparse ``type=``: ``kind`` of the text, finite and ``ok``, else an error saying ``rule``."""
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


positive_int, count = ranged(int, lambda v: v >= 1, ">= 1"), ranged(int, lambda v: v >= 0, ">= 0")
image_size = ranged(int, lambda v: v >= 8, ">= 8")
finite_positive = ranged(float, lambda v: v > 0, "a finite number > 0")
DEFAULTS = dict(dataset="shapes", data_root="data", layout="context", embeddings_order="raw", seed=0, amp=False,
                quiet=False, seen_only=False, unseen_images="ignore", sim="multihead", latent_path="gate",
                small_context="wide", pe="rpe", self_training="ast", keep=0.75, eval_res="full", log_every=10,
                save_every=0, mmd_sigmas=list(DEFAULT_SIGMAS))


def get_args_parser(*, given_only: bool = False) -> argparse.ArgumentParser:
    """train.py's flags; ``given_only``: a parser whose namespace holds only the flags written."""
    p = Parser(description="Train SIGN (Cheng et al., ICCV 2021). Flags left out take the --dataset preset's "
               "value (train.PRESETS). 'python train.py --reproduce DIR --help': the runner of the paper's tables.",
               argument_default=argparse.SUPPRESS if given_only else None)
    a = p.add_argument
    a("--dataset", choices=sorted(PRESETS), help="default: shapes, the built-in benchmark")
    a("--data-root", help="folder holding the dataset (README 'Datasets'); default: data")
    a("--layout", choices=data.SHAPES_LAYOUTS, help="shapes scenes: context (default) or uniform (README)")
    a("--embeddings", nargs="+", help="word2vec .bin and fastText .vec files (paper: both, 600-d), or a .npy table")
    a("--embeddings-order", choices=["raw", "model"], help="a .npy table's rows: by raw label id (default) or in "
      "class_names order (seen, then unseen)")
    a("--out", help="run folder; default runs/<dataset>-<timestamp>")
    a("--resume", metavar="RUN_DIR", help="continue that run from its last checkpoint, with its settings")
    a("--init-from", metavar="CHECKPOINT", help="start after the stage this end-of-stage checkpoint finished")
    a("--unseen-images", choices=["ignore", "drop"], help="training images holding an unseen class: kept, "
      "those pixels ignored (default, the lineage), or dropped (paper section 3.1; README 'Deviations')")
    a("--seen-only", action="store_true", help="stage 1 alone, no unseen class in M and C (for --add-classes)")
    a("--add-classes", nargs="*", metavar="NAME", help="with --init-from CK and --save-as NEW.pt: add these "
      "(unseen) classes to M and C and rerun the Transfer Learning Step, Eq. (10)")
    a("--save-as", metavar="NEW.pt", help="--add-classes: the checkpoint to write")
    a("--benchmark", type=positive_int, nargs="?", const=20, metavar="ITERS", help="instead of training, time "
      "ITERS (20) SIGN steps (Eq. 4 + Eqs. 7-8) against DeepLab-v2 steps on random tensors: img/s, memory")
    a("--seed", type=int, help="default: 0")
    a("--device", help="default: cuda if available, else cpu")
    a("--amp", action=argparse.BooleanOptionalAction, help="autocast: float16 with a GradScaler on CUDA, "
      "bfloat16 on the CPU; the losses stay float32; default: off")
    a("--quiet", action="store_true", help="no progress bars")
    m = p.add_argument_group("model (paper section 3; defaults: the paper's best)").add_argument
    m("--sim", choices=["none", "conv", "attention", "self-attention", "multihead"], help="SIM (Table 2); none: no SIM")
    m("--latent-path", choices=["gate", "side"], help="z reaches F_x as F_x = h + h * sigmoid(z) (gate; default) "
      "or only G reads it (side)")
    m("--latent", choices=["sim", "noise"], help="G's latent: SIM's z (paper) or N(0, 1) noise (ZS3Net; --sim none)")
    m("--pe", choices=["none", "ape", "ape-interp", "rpe"], help="positional encoding (Table 3)")
    m("--backbone", choices=["resnet101", "resnet50", "resnet18", "small"], help="E; paper: resnet101 (DeepLab-v2)")
    m("--small-context", choices=["wide", "local"], help="small CNN's receptive field: wide, 63 px (default), "
      "or local, 15 px (README 'Why SIGN trails ZS3Net here')")
    m("--pretrained", action=argparse.BooleanOptionalAction, help="E's ImageNet weights; default: on for real data")
    for name, typ, what in [("feat-dim", positive_int, "feature channels F (paper: 600)"),
                            ("pe-dim", int, "PE channels (paper: 600)"), ("small-width", int, "small CNN's channels"),
                            ("heads", positive_int, "attention heads (paper: not stated)"),
                            ("hidden", positive_int, "G / D hidden width")]:
        key = name.replace("-", "_")
        m(f"--{name}", type=typ, help=f"{what}; shapes: {PRESETS['shapes'][key]}, real data: {PRESETS['voc'][key]}")
    o = p.add_argument_group("optimisation (paper section 4.2; preset values shapes / voc)").add_argument
    non_negative = ranged(float, lambda v: v >= 0, "a finite number >= 0")
    for name, typ, paper in [
            ("iters", count, "40000"), ("transfer-iters", count, "6000 VOC, 10000 Context"),
            ("self-training-iters", count, "not stated"), ("batch-size", positive_int, "8"),
            ("crop-size", image_size, "368"), ("lr", finite_positive, "2.5e-4 SGD, poly 0.9"),
            ("lr-transfer", finite_positive, "not stated"), ("lr-g", finite_positive, "2e-4 Adam"),
            ("lr-d", finite_positive, "not stated; lineage 2.5e-4"), ("alpha", non_negative, "100"),
            ("beta", non_negative, "50"), ("temperature", finite_positive, "2"),
            ("unseen-rate", ranged(float, lambda v: 0 <= v <= 1, "in [0, 1]"), "not stated"),
            ("mmd-pixels", positive_int, "all pixels"), ("workers", count, "-"),
            ("lr-mult", finite_positive, "1; lineage (DeepLab-v2): 10, biases 20"),
            ("warmup", count, "none (stage 1's E + SIM + C: linear ramp, iterations)"),
            ("clip-grad", non_negative, "none (Eq. 4's gradient norm; 0: off)")]:
        key = name.replace("-", "_")
        o(f"--{name}", type=typ, help=f"default: {PRESETS['shapes'][key]} / {PRESETS['voc'][key]}; paper: {paper}")
    o("--optimizer", choices=["sgd", "adam"], help="for E, SIM, C; default: adam / sgd (paper: SGD, momentum 0.9)")
    o("--self-training", choices=["none", "st", "ast"], help="stage 3: AST, Eq. (17) (default), ZS3Net's ST, none")
    o("--keep", type=ranged(float, lambda v: 0 < v <= 1, "in (0, 1]"), help="ST: fraction kept per class; 0.75")
    o("--mmd-sigmas", type=finite_positive, nargs="+", help="MMD bandwidths; paper: 1 (README 'Deviations')")
    e = p.add_argument_group("evaluation and logging").add_argument
    e("--test-sizes", type=image_size, nargs="+", help="shapes: test image sizes (64 128); real data: the warp "
      "size of --eval-res feature (513)")
    e("--eval-res", choices=["full", "feature"], help="score at the label's resolution (default) or the feature's")
    e("--num-train", type=positive_int, help="shapes training images; default: 2000")
    e("--num-test", type=positive_int, nargs="+", help="shapes test images, one count or one per size; 2000 300")
    e("--log-every", type=positive_int, help="default: 10")
    e("--save-every", type=count, help="also checkpoint every N iterations; default: 0 (per stage)")
    if not given_only:
        p.set_defaults(**DEFAULTS)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag left out from the dataset's preset."""
    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.latent is None:
        args.latent = "noise" if args.sim == "none" else "sim"
    if args.out is None:
        args.out = f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def check_settings(args: argparse.Namespace) -> None:
    """The rules that tie flags together (each flag's own range is its ``type=``), checked before any
    work: a ``SettingsError`` naming the flag and what it must be."""
    w, shapes = args.small_width, args.dataset == "shapes"
    for ok, flag, rule in [
            (args.pe == "none" or (args.pe_dim >= 4 and args.pe_dim % 4 == 0), "pe-dim",
             "a positive multiple of 4 (sin and cos along two axes)"),
            (args.sim != "multihead" or args.feat_dim % args.heads == 0, "heads", f"a divisor of --feat-dim "
             f"{args.feat_dim}"),
            (args.sim != "none" or args.latent == "noise", "latent",
             "noise with --sim none (no SIM makes z: use --latent noise)"),
            (args.backbone != "small" or (w >= 2 and all(c % min(8, c) == 0 for c in (w // 2, w))), "small-width",
             "an even number up to 8 or a multiple of 16"),  # GroupNorm: min(8, c) groups divide c
            (args.backbone == "small" or args.small_context == "wide", "small-context",
             "wide (its default) unless --backbone small"),
            (not shapes or args.num_train is None or args.num_train >= args.batch_size, "num-train",
             f">= --batch-size ({args.batch_size})"),
            (not shapes or len(args.num_test) in (1, len(args.test_sizes)), "num-test",
             f"one count for all test sizes or one per size ({len(args.test_sizes)})"),
            (not (shapes and args.embeddings), "embeddings", "left out for shapes, which makes its own vectors"),
            (all(Path(path).is_file() for path in args.embeddings or ()), "embeddings", "files that exist"
             + (f" (if they moved: --resume {args.resume} --embeddings FILE ...)" if args.resume else ""))]:
        if not ok:
            raise SettingsError(f"--{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")
    out = Path(args.out)
    parent = next(p for p in [out, *out.parents] if p.exists())  # the folder mkdir would start from
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SettingsError(f"--out {out}: cannot create the run folder ({parent} is not a writable folder)")
    if not args.resume and (saved := checkpoints(out)):
        raise SettingsError(f"--out {out} already holds a run ({saved[0].name}); continue it with "
                            f"--resume {out}, or choose another folder")


RESUME_FLAGS = {"device", "quiet", "data_root", "embeddings"}  # what --resume may change: no number depends on them


def given(argv: list[str], allowed: set[str]) -> str:
    """The flags written in ``argv`` other than ``allowed``, as '--a, --b'."""
    written = vars(get_args_parser(given_only=True).parse_args(argv))
    return ", ".join("--" + k.replace("_", "-") for k in sorted(set(written) - allowed))


def intact_checkpoint(run_dir: Path) -> dict:
    """--resume: the run's newest checkpoint that reads (an unreadable newer one is named), written with
    the settings of the folder's config.json."""
    if not (saved := checkpoints(run_dir)):
        raise SettingsError(f"--resume {run_dir}: no run folder with a checkpoint_<stage>.pt")
    for path in saved:
        try:
            ckpt = read_checkpoint(path)
        except evaluate.CheckpointError as err:
            print(f"note: {err}; trying the one before it", file=sys.stderr)
            continue
        if path != saved[0]:
            print(f"note: resuming from {path.name}, the newest intact checkpoint", file=sys.stderr)
        try:
            if not isinstance(config := json.loads((run_dir / "config.json").read_text()), dict):
                raise ValueError
        except (OSError, ValueError):  # rewritten from the checkpoint, as every start writes it
            print(f"note: {run_dir / 'config.json'} is missing or unreadable; written again from {path.name}",
                  file=sys.stderr)
            config = ckpt["args"]
        if differ := differences(ckpt["args"], config, {*RESUME_FLAGS, "out", "resume", "amp_dtype"}, "in config.json"):
            raise SettingsError(f"--resume {run_dir}: {path.name} was written with other settings than its "
                                f"config.json ({differ}): the folder mixes two runs, or one file was edited")
        return ckpt
    raise SettingsError(f"--resume {run_dir}: none of its checkpoints ({', '.join(p.name for p in saved)}) reads")


def differences(saved: dict, now: dict, skip: set[str], here: str) -> str:
    """'key: A there, B <here>; ...' for each setting outside ``skip`` in which ``saved`` and ``now`` differ."""
    keys = sorted((saved.keys() | now.keys()) - skip)
    return "; ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} {here}" for k in keys if saved.get(k) != now.get(k))


def end_of_stage(path: str) -> dict:
    """--init-from, --add-classes: a checkpoint written at the end of a stage, not a --save-every one."""
    ckpt = read_checkpoint(Path(path))
    if ckpt["iteration"] < (total := ckpt["args"][STAGE_LENGTH[ckpt["stage"]]]):
        raise SettingsError(f"{path}: stage {ckpt['stage']} stopped at iteration {ckpt['iteration']} of {total} "
                            f"(a --save-every checkpoint), not at the end of a stage; continue that run with "
                            f"--resume {Path(path).parent}")
    return ckpt


# ----------------------------------------------------------------------------- main: the run
def fail(err: Exception, where: str = "") -> int:
    """One line on stderr, exit 2; raised in a DataLoader worker, the worker's message, not its traceback."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    message = lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") and len(lines) > 1 else "\n".join(lines)
    print(f"train.py: error: {message}{where}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Checks the settings before any work and reads the checkpoint the run starts from (--resume's newest
    intact one, with that run's settings, or --init-from's end of a stage); then ``run_main`` on every rank."""
    argv = sys.argv[1:] if argv is None else list(argv)
    written = {a.split("=")[0] for a in argv}
    if "--reproduce" in written:
        return reproduce_main(argv)
    if "--add-classes" in written:
        return add_classes_main(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    try:
        args, resume = get_args_parser().parse_args(argv), None
        if args.resume:
            if extra := given(argv, {"resume", *RESUME_FLAGS}):
                raise SettingsError(f"--resume {args.resume} continues that run with its saved settings; drop "
                                    f"{extra} (only --device, --quiet, --data-root and --embeddings may be given)")
            resume = intact_checkpoint(Path(args.resume))
            written = vars(get_args_parser(given_only=True).parse_args(argv))
            args = argparse.Namespace(**{**resume["args"], **written, "out": args.resume, "quiet": args.quiet})
        else:
            resume = args.init_from and end_of_stage(args.init_from)
            args.run_id = os.urandom(6).hex()  # what each checkpoint and config.json of this run carry
        check_settings(resolve(args))
        device = evaluate.choose_device(args.device)
        if args.batch_size % world:
            raise SettingsError(f"--batch-size {args.batch_size} (the global batch) must be divisible by the "
                                f"{world} processes")
    except (evaluate.CheckpointError, ValueError) as err:  # the same on every rank: rank 0 says it
        return fail(err) if os.environ.get("RANK", "0") == "0" else 2
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        rank0 = [args.out, args.run_id]  # the default folder names a timestamp: rank 0's, for every rank
        dist.broadcast_object_list(rank0, src=0)
        args.out, args.run_id = rank0
    try:
        return run_main(args, resume, device, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def build_model(args, embeddings: torch.Tensor, num_seen: int, device: torch.device, **changes) -> SIGN:
    """SIGN as the flags describe it (``changes`` override constructor arguments)."""
    return SIGN(embeddings, **{**dict(
        num_seen=num_seen, encoder=args.backbone, pretrained=args.pretrained, feat_dim=args.feat_dim, sim=args.sim,
        pe=args.pe, pe_dim=args.pe_dim, heads=args.heads, hidden=args.hidden, small_width=args.small_width,
        small_context=args.small_context, latent_path=args.latent_path,
        train_size=(args.crop_size, args.crop_size)), **changes}).to(device)


def run_main(args, resume: dict | None, device: torch.device, world: int) -> int:
    """main's work once the settings hold: the benchmark, or the run (every rank of a torchrun)."""
    rank = dist.get_rank() if world > 1 else 0
    args.device, args.amp_dtype = str(device), str(amp_dtype(device, args.amp)).removeprefix("torch.")
    if args.benchmark is not None:
        return benchmark(args, device)
    if rank == 0:
        print("settings:", json.dumps(vars(args), indent=1))
    out, run = Path(args.out), None

    def resumable():  # for the last message of an interrupted or failed run
        last = next(iter(checkpoints(out)), None)
        return (f"the last checkpoint, {last}, is intact: continue with python train.py --resume {out}" if last
                else "no checkpoint was written yet")
    try:
        train_set, tests, embeddings, kept = build_data(args)
        if rank == 0:
            print(f"training images: {len(train_set)} (--unseen-images {args.unseen_images}; ignore keeps "
                  f"{kept['ignore']}, drop {kept['drop']})")
        if args.seen_only:  # M never holds an unseen class's vector
            embeddings = torch.cat([embeddings[:train_set.num_seen], embeddings[train_set.num_seen:] * 0])
        torch.manual_seed(args.seed)
        model = build_model(args, embeddings, train_set.num_seen, device)
        if args.seen_only:  # built whole, then cut: the initial weights are the full run's, so is stage 1
            model = model.first_classes(train_set.num_seen)
        if resume and (differ := architecture_differences(resume["config"], model.config, args)):
            raise SettingsError(f"{args.init_from or args.resume} holds another model than these settings build "
                                f"({differ}); give the flags it was trained with")
        out.mkdir(parents=True, exist_ok=True)
        with claimed(out) if rank == 0 else contextlib.nullcontext():
            if rank == 0:
                write_atomically(out / "config.json",
                                 lambda tmp: tmp.write_text(json.dumps(vars(args), indent=2, allow_nan=False)))
            run = Run(args, device, model, train_set.class_names, train_set, tests, out, rank, world)
            return train_all(run, resume)
    except FloatingPointError as err:  # run_stage's: nothing was stepped or saved
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"\ninterrupted: {run.at if run else 'building the data'}; {resumable()}", file=sys.stderr)
        return 130
    except RuntimeError as err:  # a collective whose peer stopped: that rank has said why
        if world == 1 or not (isinstance(err, dist.DistError) or "remote worker" in str(err)):  # gloo says so
            raise
        return fail(RuntimeError("another process of this torchrun stopped; its message is above"),
                    f" ({run.at if run else 'building the data'}; {resumable()})")
    except (data.DatasetError, OSError, ValueError) as err:  # OSError: a file that cannot be written
        if run and type(err) is ValueError:
            raise  # from inside the training loop a ValueError is a bug: keep its traceback
        if not run and args.resume and isinstance(err, data.DatasetError):  # the data may have moved
            return fail(err, f" (if the data moved: --resume {out} --data-root DIR)")
        return fail(err, f" ({run.at}; {resumable()})" if run else "")


@contextlib.contextmanager
def claimed(folder: Path):
    """One process per run folder: an exclusive lock on the folder while the run writes to it, which the
    system releases once the process and the loader workers it forked, which share the lock, have died."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        if fcntl:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SettingsError(f"{folder} is in use by another train.py process (a run, a --resume of it, or "
                                    "the loader workers of one just killed, for a few seconds); wait until it ends, "
                                    "or choose another --out") from None
        yield
    finally:
        os.close(handle)


def architecture_differences(saved: dict, built: dict, args) -> str:
    """'--flag A in the checkpoint, --flag B in this run' for each setting in which two SIGN configs differ
    ('' if none); ``pretrained`` says only where the first weights came from, ``train_size`` matters to
    ``pe="ape-interp"`` alone."""
    def shown(key, value):
        flag = {"encoder": "backbone", "latent_dim": "feat_dim", "train_size": "crop_size"}.get(key, key)
        value = value[0] if key == "train_size" and value else value
        return f"--{flag.replace('_', '-')} {value}" if flag in vars(args) else f"{key} {value}"
    return ", ".join(f"{shown(k, saved.get(k))} in the checkpoint, {shown(k, v)} in this run" for k, v in built.items()
                     if saved.get(k) != v and k != "pretrained" and (k != "train_size" or built["pe"] == "ape-interp"))


# ----------------------------------------------------------------------------- --benchmark
def benchmark(args, device: torch.device, warmup: int = 3) -> int:
    """The SIGN step (Eq. 4, then Eqs. 7-8) against a plain DeepLab-v2 step (E, C, cross-entropy: Eq. 4
    without SIM) on random images and seen labels of the preset's size, with random weights, interleaved
    so that both see the same machine state. Peak memory: CUDA's per step, or the process's peak RSS."""
    import resource
    K, U = data.CLASS_COUNTS[args.dataset]
    S, B, H, cuda = K - U, args.batch_size, args.crop_size, device.type == "cuda"
    torch.manual_seed(args.seed)
    table = F.normalize(torch.randn(K, 600), dim=1)  # stands in for the word vectors
    runs = {name: Run(args, device, build_model(args, table, S, device, pretrained=False, sim=sim))
            for name, sim in (("SIGN step (Eq. 4 + Eqs. 7-8)", args.sim), ("DeepLab-v2 step (E -> C -> CE)", "none"))}
    opts = {name: make_optimizers(run.model, args, transfer=False) for name, run in runs.items()}
    seconds, peaks = {name: [] for name in runs}, {name: [] for name in runs}
    x, y = torch.randn(B, 3, H, H, device=device), torch.randint(0, S, (B, H, H), device=device)
    for i in tqdm(range(warmup + args.benchmark), desc="benchmark", disable=args.quiet):
        for name, run in runs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                torch.cuda.synchronize()
            start = time.perf_counter()
            F_x, z, _ = training_step_sim(run, x, y, opts[name]["sim"])
            if run.model.SIM is not None:
                training_step_g(run, F_x, z if args.latent == "sim" else None, y, opts[name]["g"], opts[name]["d"])
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                seconds[name].append(time.perf_counter() - start)
                peaks[name].append(torch.cuda.max_memory_allocated(device) if cuda else 0)
    print(f"benchmark: {args.dataset} preset, {args.backbone}, batch {B}, crop {H}, {device} "
          f"({torch.get_num_threads()} threads), {args.amp_dtype}, {args.benchmark} iterations after {warmup} warm-up")
    mean = {name: sum(times) / len(times) for name, times in seconds.items()}
    for name, step_s in mean.items():
        memory = f", peak {max(peaks[name]) / 2**30:.2f} GiB allocated" if cuda else ""
        print(f"  {name:32s} {B / step_s:8.2f} img/s  {step_s:.3f} s/iteration{memory}")
    sign_s, plain_s = mean.values()
    print(f"  ratio SIGN / DeepLab-v2 step time: {sign_s / plain_s:.2f}")
    if not cuda:  # ru_maxrss is in KiB on Linux
        print(f"  peak RSS of the process (both models): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


# ----------------------------------------------------------------------------- --add-classes
def add_classes_main(argv: list[str]) -> int:
    """``--add-classes NAME ... --init-from CK --save-as NEW.pt [--embeddings F ...]``: M gains a row and
    C an output per name (``SIGN.with_classes``), then the Transfer Learning Step (Eq. 10) runs with the
    checkpoint's settings and batches, E, SIM and G fixed. The new classes count as unseen."""
    start = time.perf_counter()
    try:
        args = get_args_parser().parse_args(argv)
        if extra := given(argv, {"add_classes", "init_from", "save_as", "embeddings", "device", "quiet"}):
            raise SettingsError(f"--add-classes runs with the checkpoint's settings; drop {extra}")
        if not (args.add_classes and args.init_from and args.save_as):
            raise SettingsError("--add-classes needs one class name or more, --init-from CHECKPOINT and "
                                "--save-as NEW.pt")
        if (save_as := Path(args.save_as)).exists() or not os.access(save_as.parent, os.W_OK | os.X_OK):
            raise SettingsError(f"--save-as {save_as}: expected a new file in a writable folder; "
                                + ("it exists" if save_as.exists() else f"{save_as.parent} is not one"))
        ckpt = end_of_stage(args.init_from)
        saved = argparse.Namespace(**{**ckpt["args"], "quiet": args.quiet, "amp": False})  # its settings, float32
        device = evaluate.choose_device(args.device)
        train_set = build_data(saved, tests=False)[0]
        def normal(name: str) -> str:  # 'Red_Triangle' and 'red-triangle': 'red triangle'
            return " ".join(data.name_words(name)).lower()
        names, added = ckpt["class_names"], [normal(n) for n in args.add_classes]
        if empty := [n for n, a in zip(args.add_classes, added) if not a]:
            raise SettingsError(f"--add-classes: {', '.join(map(repr, empty))} holds no word; expected class names")
        if clash := [n for n, a in zip(args.add_classes, added) if a in map(normal, names) or added.count(a) > 1]:
            raise SettingsError(f"--add-classes: {', '.join(map(repr, clash))} already in the checkpoint's classes "
                                f"or given twice (names compare in lower case, '_' and '-' as spaces); it has "
                                f"{', '.join(names)}")
        rows = data.added_class_embeddings(saved.dataset, added, args.embeddings or saved.embeddings,
                                           dim=ckpt["config"]["embed_dim"])
    except (evaluate.CheckpointError, data.DatasetError, ValueError) as err:
        return fail(err)
    model = SIGN.from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    # C's new rows as a fresh model of the new size, seeded as the run was, draws them: for a
    # --seen-only checkpoint given its dataset's unseen names, the rows the full run starts from
    torch.manual_seed(saved.seed)
    model = model.with_classes(rows).to(device)  # (K + n classes): the new ones after the unseen
    run = Run(saved, device, model, names + added, train_set, at="the transfer step")
    run.nets = step_networks(model, transfer=True)
    opts = make_optimizers(model, saved, transfer=True)
    run_stage(run, "transfer", saved.transfer_iters, lambda x, y, padding: transfer_step(run, x, y, opts["c"]), opts)
    save_checkpoint(run, "transfer", saved.transfer_iters, opts, path=save_as)
    span = f"class {len(names)}" if len(rows) == 1 else f"classes {len(names)}-{len(run.class_names) - 1}"
    print(f"added {', '.join(added)} (unseen, {span}) and re-fitted C in {saved.transfer_iters} "
          f"transfer iterations: {args.save_as}, {time.perf_counter() - start:.1f} s")
    return 0


# ----------------------------------------------------------------------------- --reproduce: the tables on shapes
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


def reproduce(root, seeds: Sequence[int], train_args: Sequence[str] = (), *, names: Sequence[str] | None = None,
              jobs: int = 1) -> list[str]:
    """Every run of EXPERIMENTS (or of ``names`` and their base runs) for every seed, base runs first, as
    ``root/<name>/seed<k>``: ``jobs`` ``python train.py`` processes at a time (on two cores two runs of one
    thread each beat one of two; a failing run takes no other down), logging to ``train.log``. A finished run
    is kept, an interrupted one resumes, if its config.json matches these settings (else a ValueError names
    the differences). Returns the folders of the runs that failed."""
    root = Path(root).resolve()  # absolute: --init-from paths are stored in config.json
    if reserved := [a for a in train_args if a.split("=")[0] in RESERVED]:
        raise ValueError(f"--reproduce sets {reserved} itself; remove them")
    names = list(EXPERIMENTS) if names is None else list(names)
    if unknown := [n for n in names if n not in EXPERIMENTS]:
        raise ValueError(f"--experiments: unknown {unknown}; expected names from {list(EXPERIMENTS)}")
    names = set(names) | {EXPERIMENTS[n][1] for n in names}  # and their base runs
    waves = [[], []]  # base runs, then the runs that start from their checkpoint_transfer.pt
    for seed, name in itertools.product(seeds, [n for n in EXPERIMENTS if n in names]):
        flags, base = EXPERIMENTS[name]
        out = root / name / f"seed{seed}"
        argv = [*flags, *train_args, "--seed", str(seed), "--out", str(out), "--quiet"]
        if base:
            argv += ["--init-from", str(root / base / f"seed{seed}" / "checkpoint_transfer.pt")]
        if (out / "config.json").is_file():
            saved = json.loads((out / "config.json").read_text())
            expected = vars(resolve(get_args_parser().parse_args(argv)))
            if differ := differences(saved, expected, {"out", "resume", "init_from", "device", "quiet", "run_id",
                                                       "amp_dtype"}, "now"):
                raise ValueError(f"run {out} was made with other settings ({differ}); delete it or reproduce into "
                                 "another folder")
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


def reproduce_main(argv: list[str]) -> int:
    """``python train.py --reproduce DIR [--seeds ...] [--experiments ...] [--jobs N] [train.py flags]``:
    the runs, then ``DIR/tables.md`` (``evaluate.reproduction_tables``), and the wall time."""
    p = Parser(prog="train.py --reproduce", allow_abbrev=False,  # --seed must not mean --seeds
               description="Run the paper's experiments on shapes (train.EXPERIMENTS) and tabulate them; other "
               "flags go to every run.")
    p.add_argument("--reproduce", type=Path, required=True, metavar="DIR", help="run folders DIR/<name>/seed<k>")
    p.add_argument("--seeds", type=count, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--experiments", nargs="+", metavar="NAME", help="only these runs (and the runs they start "
                   f"from); 'claimed' = {' '.join(CLAIMED)}; default: all of train.EXPERIMENTS")
    p.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1),
                   help="runs at a time; default: 2 on two or more cores, else 1")
    start = time.perf_counter()
    try:
        args, train_args = p.parse_known_args(argv)
        names = args.experiments and [n for e in args.experiments for n in (CLAIMED if e == "claimed" else [e])]
        if args.reproduce.exists() and not args.reproduce.is_dir():
            raise ValueError(f"--reproduce {args.reproduce} is a file; expected the folder of the runs")
        if twice := sorted({s for s in args.seeds if args.seeds.count(s) > 1}):
            raise ValueError(f"--seeds: {twice} given twice; expected each seed once")
        if (tables_md := args.reproduce / "tables.md").exists() and not tables_md.is_file():
            raise ValueError(f"{tables_md} is not a file; expected the tables' file, or none")
        # a bad flag or value fails here, once, before any run starts
        check_settings(resolve(get_args_parser().parse_args([*train_args, "--out", str(args.reproduce / "_")])))
        failed = reproduce(args.reproduce, args.seeds, train_args, names=names, jobs=args.jobs)
        tables = evaluate.reproduction_tables(args.reproduce)
        write_atomically(tables_md, lambda tmp: tmp.write_text(tables + "\n"))
    except (ValueError, OSError, evaluate.CheckpointError) as e:  # CheckpointError: a run's checkpoint_train.pt
        return fail(e)
    except KeyboardInterrupt:  # Ctrl-C reaches the runs too: each keeps its last checkpoint
        print(f"\ninterrupted: finished runs are kept and interrupted ones resume from their last checkpoint; "
              f"continue with the same --reproduce {args.reproduce} command", file=sys.stderr)
        return 130
    print(tables + f"\n\nwritten to {tables_md}; wall time {time.perf_counter() - start:.0f} s")
    if failed:
        print("train.py: these runs failed and are missing from the tables:\n  " + "\n  ".join(failed),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
