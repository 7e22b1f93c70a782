"""The GZSL metric (paper section 4.2), the test loop that scores a model, and the evaluation CLI. In reading order:
the metric, the test loop, checkpoints, pictures (``--save-predictions``, ``--image``), what z carries
(``--latent-stats``), the tables of ``train.py --reproduce`` run folders (``--tables``), main.

Convention (PROTOCOL section 5, pinned by ``tests/test_metrics.py``): one confusion matrix per test set (rows ground
truth t, columns prediction p), never averaged over images; pixels labelled ``ignore_index`` (255, also VOC's
background) never count. IoU_c = TP_c / (TP_c + FP_c + FN_c) in %; a class absent from both ground truth and prediction
has no IoU (the means skip it, ``per_class`` omits it), one only predicted has IoU 0. S (``seen_miou``), U = mean IoU
of the present seen / unseen classes of the K (seen first; 0 if none); H = 2 S U / (S + U), 0 if S or U is 0.
``eval_res="full"`` (default) scores logits upsampled bilinearly to the label; ``"feature"`` (ZS3Net, CaGNet) warps
images to 513 x 513 and scores the feature-map logits at their size.
"""
import argparse
import json
import statistics
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import data
from sign import IGNORE as IGNORE_INDEX, SIGN, resize_labels

EVAL_RES = ("full", "feature")
GAP, LEGEND_W, ROW, MIN_TILE = 4, 200, 14, 128  # the pictures, in pixels: spacing, legend width, text row, least tile


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """confusion[t, p], (K, K) int64, of integer ``pred``, ``target`` of one shape; ``ignore_index`` pixels dropped."""
    K = num_classes
    if K < 1 or pred.shape != target.shape or pred.is_floating_point() or target.is_floating_point():
        raise ValueError(f"confusion_matrix: num_classes must be >= 1 and pred, target integer class indices of the "
                         f"same shape; got {K}, {pred.dtype} {tuple(pred.shape)}, {target.dtype} {tuple(target.shape)}")
    t, p = (v[target != ignore_index].long() for v in (target, pred))  # (N,) each, N = labelled pixels
    for name, v in (("target", t), ("pred", p)):
        if v.numel() and (v.min() < 0 or v.max() >= K):
            raise ValueError(f"confusion_matrix: {name} values at labelled pixels must lie in [0, {K}) (or be "
                             f"the ignore index {ignore_index} in target), found [{int(v.min())}, {int(v.max())}]")
    return torch.bincount(t * K + p, minlength=K * K).reshape(K, K)  # (K, K): row-major t * K + p, one bincount


def harmonic(s: float, u: float) -> float:
    """H = 2 S U / (S + U) of two non-negative scores; 0 when either is 0 (no division by 0)."""
    if s < 0 or u < 0:
        raise ValueError(f"harmonic: expected non-negative scores, got {s} and {u}")
    return 0.0 if s == 0 or u == 0 else 2 * s * u / (s + u)  # statistics.harmonic_mean differs in the last bit


def gzsl_miou(confusion: Tensor, seen: Sequence[int], unseen: Sequence[int]) -> dict:
    """Seen / unseen / harmonic mIoU (percent) from an accumulated (K, K) confusion matrix: ``{"seen_miou": S,
    "unseen_miou": U, "harmonic_miou": H, "per_class": {class index: IoU}}``, present classes only (never NaN), and
    ``unseen_as_seen`` / ``seen_as_unseen``: the % of unseen / seen classes' pixels labelled a seen / unseen class."""
    negative = int((confusion < 0).sum())
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1] or confusion.is_floating_point() or negative:
        raise ValueError(f"gzsl_miou: expected a square (K, K) matrix of non-negative integer pixel counts, got "
                         f"shape {tuple(confusion.shape)}, dtype {confusion.dtype}, {negative} negative")
    K = confusion.shape[0]
    if sorted([*seen, *unseen]) != list(range(K)):  # else a class would vanish from the means or count twice
        raise ValueError(f"gzsl_miou: seen {list(seen)} and unseen {list(unseen)} must split the classes "
                         f"[0, {K}) into disjoint lists, each class once")
    n = confusion.detach().to("cpu", torch.float64)  # (K, K); float64: a test set's ~10^10 pixel counts stay exact
    tp, union = n.diagonal(), n.sum(0) + n.sum(1) - n.diagonal()  # (K,) each; union: TP + FP + FN
    per_class = {c: 100.0 * tp[c].item() / union[c].item() for c in range(K) if union[c] > 0}
    present = [[per_class[c] for c in classes if c in per_class] for classes in (seen, unseen)]
    S, U = (sum(ious) / len(ious) if ious else 0.0 for ious in present)
    def share(rows, cols):  # % of the labelled pixels of ``rows`` predicted as one of ``cols`` (GZSL's bias)
        total = n[list(rows)].sum().item()
        return 100.0 * n[list(rows)][:, list(cols)].sum().item() / total if total else 0.0
    return {"seen_miou": S, "unseen_miou": U, "harmonic_miou": harmonic(S, U), "per_class": per_class,
            "unseen_as_seen": share(unseen, seen), "seen_as_unseen": share(seen, unseen)}


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: Iterable, *, num_classes: int, device: torch.device | str,
                   eval_res: str = "full", ignore_index: int = IGNORE_INDEX, quiet: bool = False,
                   label_map: Tensor | None = None, sharded: bool = False) -> Tensor:
    """Sum of ``confusion_matrix`` over (image (B, 3, H, W), label (B, H, W)) batches, in eval mode, on the CPU.
    ``label_map`` (256,) renumbers the labels (``scored_classes``); ``sharded``: the ranks' matrices are summed."""
    if eval_res not in EVAL_RES:
        raise ValueError(f"evaluate_model: eval_res must be one of {EVAL_RES}, got {eval_res!r}")
    K, was_training = num_classes, model.training
    model.eval()
    confusion = torch.zeros(K, K, dtype=torch.long, device=device)
    for x, y in tqdm(loader, desc=f"evaluate ({eval_res})", leave=False, disable=quiet):
        x, y = x.to(device), (y if label_map is None else label_map[y]).to(device)  # label_map: ids -> scored order
        logits = model(x) if eval_res == "full" else model.C(model.features(x)[0])  # (B, K', H', W')
        if logits.dim() != 4 or not 0 < logits.shape[1] <= K:  # fewer: a --seen-only model never predicts the rest
            raise ValueError(f"evaluate_model: expected logits (B, K' <= {K}, H, W), got {tuple(logits.shape)}")
        if eval_res == "full" and logits.shape[-2:] != y.shape[-2:]:
            logits = nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        elif eval_res == "feature":
            y = resize_labels(y, logits.shape[-2:])  # (B, h, w), nearest
        confusion += confusion_matrix(logits.argmax(1), y, K, ignore_index)  # (K, K)
    model.train(was_training)
    if sharded:  # each rank scored its shard (evaluate_sets): the sum is the whole test set's
        dist.all_reduce(confusion)
    return confusion.cpu()


def test_sets(dataset: str, *, root=None, sizes: Sequence[int] | None = None, eval_res: str = "full", seed: int = 0,
              num_images: int | Sequence[int] | None = None, layout: str = "context") -> dict[str, Dataset]:
    """shapes: ``{str(s): Shapes("test", size=s, seed=seed)}`` per size (default [64, 128]), ``num_images`` one count
    or one per size; real data: ``{"val" or "test": whole images}``, warped to ``sizes[0]`` (513) for "feature"."""
    # Real data at several sizes would silently use sizes[0] and hide a typo.
    if eval_res not in EVAL_RES or (dataset != "shapes" and sizes is not None and len(sizes) != 1):
        raise ValueError(f"test_sets: eval_res must be one of {EVAL_RES} and real data is tested at one size; got "
                         f"{eval_res!r} and sizes {sizes} for {dataset}")
    if dataset == "shapes":
        sizes = sizes or [64, 128]
        counts = list(num_images) if isinstance(num_images, (list, tuple)) else [num_images]
        if len(counts) not in (1, len(sizes)):
            raise ValueError(f"test_sets: {len(counts)} test-image counts {counts} for {len(sizes)} test "
                             f"sizes {list(sizes)}; give one count, or one per size")
        return {str(s): data.Shapes("test", size=s, num_images=n, layout=layout, seed=seed)
                for s, n in zip(sizes, counts * len(sizes) if len(counts) == 1 else counts)}
    size = (sizes or [513])[0] if eval_res == "feature" else None
    return {"val" if dataset == "voc" else "test": data.build_dataset(
        dataset, "test", root=root, transform=data.eval_transform(size))}


def evaluate_sets(model: nn.Module, sets: dict, *, class_names: Sequence[str], num_seen: int,
                  device: torch.device | str, eval_res: str = "full", batch_size: int = 16, workers: int = 0,
                  quiet: bool = False, title: str = "", label_map: Tensor | None = None) -> dict[str, dict]:
    K, metrics, seen, unseen = len(class_names), {}, list(range(num_seen)), list(range(num_seen, len(class_names)))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    for name, dataset in sets.items():  # real images differ in size, so they go one at a time
        shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset  # no image twice
        loader = DataLoader(shard, batch_size if isinstance(dataset, data.Shapes) else 1, num_workers=workers)
        confusion = evaluate_model(model, loader, num_classes=K, device=device, eval_res=eval_res, quiet=quiet,
                                   label_map=label_map, sharded=world > 1)
        result = gzsl_miou(confusion, seen, unseen)
        metrics[name] = as_metrics(result, class_names)
        if rank == 0:
            print(f"\n{title and f'[{title}] '}test set {name}\n" + format_table(result, class_names, seen, unseen))
    return metrics


def format_table(result: dict, class_names: Sequence[str], seen: Sequence[int], unseen: Sequence[int]) -> str:
    width, iou = max([len("class")] + [len(class_names[c]) for c in (*seen, *unseen)]), result["per_class"]
    lines = [f"{'#':>4}  {'class':<{width}}  {'split':<6}  {'IoU %':>6}"]
    lines += [f"{c:>4}  {class_names[c]:<{width}}  {split:<6}  " + (f"{iou[c]:6.2f}" if c in iou else f"{'absent':>6}")
              for split, classes in (("seen", seen), ("unseen", unseen)) for c in classes]
    present = [sum(c in iou for c in cs) for cs in (seen, unseen)]
    lines.append(f"mIoU %  seen {result['seen_miou']:.2f} ({present[0]}/{len(seen)} classes present)  unseen "
                 f"{result['unseen_miou']:.2f} ({present[1]}/{len(unseen)})  harmonic {result['harmonic_miou']:.2f}\n"
                 f"pixels %  unseen labelled seen {result['unseen_as_seen']:.2f}  seen labelled unseen "
                 f"{result['seen_as_unseen']:.2f}")
    return "\n".join(lines)


def as_metrics(result: dict, class_names: Sequence[str]) -> dict:
    if beyond := [c for c in result["per_class"] if not 0 <= c < len(class_names)]:
        raise ValueError(f"as_metrics: {len(class_names)} class names given, but per_class has classes {beyond}")
    return {**result, "per_class": {class_names[c]: iou for c, iou in result["per_class"].items()}}


def scored_classes(model_names: Sequence[str], dataset_names: Sequence[str], num_seen: int
                   ) -> tuple[list[str], Tensor | None]:
    """A model's classes (fewer than the dataset's after ``train.py --seen-only``, more after ``--add-classes``),
    then the dataset's it does not know; and the (256,) map of the dataset's label ids into that order (None: same)."""
    known = [n.lower() for n in model_names]
    if known[:num_seen] != [n.lower() for n in dataset_names[:num_seen]]:
        raise CheckpointError(f"the checkpoint's seen classes ({', '.join(model_names[:num_seen])}) are not the "
                              f"dataset's ({', '.join(dataset_names[:num_seen])})")
    names = list(model_names) + [n for n in dataset_names if n.lower() not in known]
    order = [[m.lower() for m in names].index(n.lower()) for n in dataset_names]  # dataset id -> scored index
    return names, None if order == [*range(len(order))] else torch.tensor(order + [IGNORE_INDEX] * (256 - len(order)))


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, or not a model written by train.py."""


def read_checkpoint(path, keys: Sequence[str] = ("model", "config")) -> dict:
    """The dict ``train.py`` saved at ``path``, holding ``keys``; else a one-line ``CheckpointError`` naming it."""
    try:  # not torch's advice on failure, weights_only=False: that runs the file's code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # nothing there, a folder, no permission
        raise CheckpointError(f"{path} is not a train.py checkpoint: {e.strerror or e}") from None
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a train.py checkpoint: torch.load cannot read it "
                              f"({type(e).__name__}; truncated, corrupt, or not written by torch.save)") from e
    if missing := [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else list(keys):
        raise CheckpointError(f"{path} is not a train.py checkpoint: it holds a {type(ckpt).__name__} "
                              f"without {', '.join(map(repr, missing))}")
    return ckpt


def load_checkpoint(path, device: torch.device | str) -> tuple[SIGN, dict]:
    ckpt = read_checkpoint(path, keys=("model", "config", "args", "stage", "iteration", "class_names"))
    try:
        model = SIGN.from_config(ckpt["config"])
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # a config or state dict that no SIGN of this code takes
        raise CheckpointError(f"{path}: its model does not load into this code's SIGN ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]})") from e
    return model.to(device).eval(), ckpt


def choose_device(name: str | None) -> torch.device:
    n = torch.cuda.device_count()
    usable = ["cpu"] + ["cuda"] * (n > 0) + [f"cuda:{i}" for i in range(n)]
    if name is not None and name not in usable:
        raise ValueError(f"--device {name}: expected one of this machine's devices, {', '.join(usable)} "
                         f"(--device cpu always works)")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _panel(tiles: dict[str, np.ndarray], heading: str, present: Sequence[int], class_names: Sequence[str],
           num_seen: int, colours: np.ndarray, notes: dict | None = None) -> Image.Image:
    f = -(-MIN_TILE // max(next(iter(tiles.values())).shape[:2]))  # ceil: tiny tiles upscaled (nearest), legible
    tiles = {title: t.repeat(f, 0).repeat(f, 1) for title, t in tiles.items()}  # (fH, fW, 3) each
    h, w = next(iter(tiles.values())).shape[:2]
    w = max(w, MIN_TILE)  # a column at least MIN_TILE wide: the titles of narrow tiles do not overlap
    x = len(tiles) * (w + GAP) + GAP  # the legend's left edge
    panel = Image.new("RGB", (x + LEGEND_W, ROW + max(h, len(present) * ROW) + GAP), "white")
    draw = ImageDraw.Draw(panel)
    for j, (title, tile) in enumerate(tiles.items()):
        panel.paste(Image.fromarray(tile), (GAP + j * (w + GAP), ROW))
        draw.text((GAP + j * (w + GAP), 1), title, fill="black")
    draw.text((x, 1), heading, fill="black")
    for y, c in zip(range(ROW, ROW * (len(present) + 1), ROW), present):
        draw.rectangle([x, y + 1, x + 10, y + 11], fill=tuple(map(int, colours[c])), outline="black")
        draw.text((x + 14, y), class_names[c] + " (unseen)" * (c >= num_seen) + (notes or {}).get(c, ""),
                  fill="firebrick" if c >= num_seen else "black")
    return panel


@torch.inference_mode()
def save_panels(model: nn.Module, dataset, out_dir, num: int, *, class_names: Sequence[str], num_seen: int,
                device: torch.device | str, palette: np.ndarray | None = None,
                label_map: Tensor | None = None) -> list[Path]:
    colours = data.label_colours(len(class_names), getattr(dataset, "palette", None) if palette is None else palette)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (dataset.mean, dataset.std))
    out_dir, paths = Path(out_dir), []
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    for i in range(min(num, len(dataset))):
        image, label = dataset[i]  # (3, H, W), (H, W)
        label = label if label_map is None else label_map[label.long()]
        pred = model(image[None].to(device)).argmax(1)[0].cpu().numpy()  # (H, W)
        rgb = ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
        tiles = {"image": rgb, "ground truth": colours[label.numpy()], "prediction": colours[pred]}  # (H, W, 3) each
        present = sorted((set(label.unique().tolist()) - {IGNORE_INDEX}) | set(np.unique(pred).tolist()))
        paths.append(out_dir / f"{i:04d}.png")
        _panel(tiles, "classes (GT or prediction)", present, class_names, num_seen, colours).save(paths[-1])
    return paths


def read_image(path) -> Tensor:
    """(3, H, W) uint8 RGB, upright (EXIF), refused over PIL's Image.MAX_IMAGE_PIXELS (decompression bombs)."""
    try:
        with warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning):  # PIL only warns
            image = ImageOps.exif_transpose(Image.open(path))  # decodes: a broken file fails here
        if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
            return TF.pil_to_tensor(image.convert("RGB"))
    except Exception as e:  # PIL raises many types for a broken, foreign or too large file
        raise ValueError(f"--image {path}: not a readable image ({getattr(e, 'strerror', None) or e})") from None
    a = np.asarray(image, np.float32)  # (H, W)
    if not np.isfinite(a).all():
        raise ValueError(f"--image {path}: holds NaN or infinite pixel values; expected finite ones")
    lo, hi = (0, 65535) if image.mode != "F" else (0, 1) if 0 <= a.min() <= a.max() <= 1 else (a.min(), a.max())
    a = ((a - lo) / max(hi - lo, 1e-12)).clip(0, 1)  # a float image outside [0, 1], e.g. depth: its own range
    return torch.from_numpy((a * 255).round().astype(np.uint8)).expand(3, -1, -1)


@torch.inference_mode()
def predict_images(model: nn.Module, paths: Sequence, out_dir, *, class_names: Sequence[str], num_seen: int,
                   mean: Sequence[float], std: Sequence[float], device: torch.device | str, size: int | None = None,
                   palette: np.ndarray | None = None, max_side: int = 0) -> list[tuple[Path, dict[str, float], str]]:
    """Each image predicted into ``out_dir/<stem>.png``, image | prediction, legend: [(file, {class: %}, size note)]."""
    colours, out_dir, results = data.label_colours(len(class_names), palette), Path(out_dir), []
    images = [read_image(path) for path in paths]  # (3, H, W) uint8 each; every file is read before any is predicted
    inputs, taken = {str(Path(p).resolve()).lower() for p in paths}, set()  # lower: case-insensitive file systems
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    for path, image in zip(paths, images):
        (H, W), stem = image.shape[-2:], Path(path).stem  # <stem>-2 ... where names clash or an input would go
        name = next(n for n in [stem] + [f"{stem}-{k}" for k in range(2, 2 * len(paths) + 3)]
                    if n.lower() not in taken and str((out_dir / f"{n}.png").resolve()).lower() not in inputs)
        taken.add(name.lower())
        r = max_side / max(H, W) if 0 < max_side < max(H, W) else 1
        h, w = (size, size) if size else (max(16, round(H * r)), max(16, round(W * r)))  # 16: GroupNorm's > 1 pixel
        x = (TF.resize(image, [h, w], antialias=True) if (h, w) != (H, W) else image).float() / 255  # resized as uint8
        try:
            pred = model(TF.normalize(x, mean, std)[None].to(device)).argmax(1).cpu()  # (1, h, w)
        except RuntimeError as e:  # a failed allocation (attention grows with the square of the pixels) is one
            raise ValueError(f"--image {path}: predicting at {w}×{h} failed ({str(e).splitlines()[0]}); a smaller "
                             f"--max-side needs less memory") from None
        pred = TF.resize(pred, [H, W], interpolation=TF.InterpolationMode.NEAREST)[0]  # (H, W)
        shares = dict(sorted(((int(c), 100 * int(n) / pred.numel()) for c, n in zip(*pred.unique(return_counts=True))),
                             key=lambda kv: -kv[1]))  # {class: % of pixels}, the largest first
        overlay = (image * 0.4 + torch.from_numpy(colours)[pred].permute(2, 0, 1) * 0.6).to(torch.uint8)  # 60 % class
        tiles = {"image": image.permute(1, 2, 0).numpy(), "prediction": overlay.permute(1, 2, 0).numpy()}
        note = f"predicted at {w}×{h}, resized from {W}×{H}" if (h, w) != (H, W) else ""
        results.append((out_dir / f"{name}.png", {class_names[c]: v for c, v in shares.items()}, note))
        _panel(tiles, "classes predicted", sorted(shares), class_names, num_seen, colours,
               {c: f" {v:.1f} %" for c, v in shares.items()}).save(results[-1][0])
    return results


@torch.enable_grad()  # the probes are fitted whatever the caller's grad mode; the model runs under no_grad
def latent_statistics(model: SIGN, dataset, *, num_images: int = 400, max_pixels: int = 40_000,
                      device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float | int]:
    """What G's z = mu + sigma eps carries on the labelled seen pixels of the first ``num_images`` items."""
    if model.SIM is None:
        raise ValueError("latent_statistics: this model has no SIM, so G's latent is pure noise")
    was_training, n = model.training, min(num_images, len(dataset))
    model.eval().SIM.train()  # training mode for SIM alone: z is sampled as Training Step (G) sees it
    pixels = []  # per image: z, mu, sigma^2 (pixels, L) each, the labels and the half of each pixel (pixels,)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)  # eps is drawn from a seed of its own; fork_rng keeps the caller's stream
        for i, (x, y) in zip(range(n), dataset):
            _, z, mu, logvar = model.features(x[None].to(device))  # (1, L, h, w) each
            y = resize_labels(y[None].to(device), z.shape[-2:]).flatten()  # (h*w,)
            keep = y < model.num_seen  # labelled seen pixels; 255 is above every class index
            pixels.append([t[0].flatten(1).T[keep].float().cpu() for t in (z, mu, logvar.exp())]
                          + [y[keep].cpu(), torch.full((int(keep.sum()),), i >= n // 2)])
    model.train(was_training)
    z, mu, var, y, test = (torch.cat(t) for t in zip(*pixels))
    if test.all() or not test.any():
        raise ValueError(f"latent_statistics: need labelled seen pixels in both halves of {n} images")
    g = torch.Generator().manual_seed(seed)
    fit, score = (mask.nonzero()[:, 0][torch.randperm(int(mask.sum()), generator=g)[:max_pixels // 2]]
                  for mask in (~test, test))  # at most max_pixels / 2 random pixels of each half
    snr = mu.var(0) / var.mean(0)  # (L,): Var over pixels of mu_c, against the mean of sigma_c^2
    stats = {"mu2": mu.pow(2).mean().item(), "sigma2": var.mean().item(), "snr_median": snr.median().item(),
             "snr_max": snr.max().item()}
    weight = 1 / torch.bincount(y[fit], minlength=model.num_seen).clamp_min(1).float()  # unweighted: sky everywhere
    for name, v in (("z", z), ("noise", torch.randn(z.shape, generator=g)), ("mu", mu)):
        x, x_test = ((v[i] - v[fit].mean(0)) / v[fit].std(0).clamp_min(1e-6) for i in (fit, score))  # standardised
        probe = nn.Linear(x.shape[1], model.num_seen)  # from zeros: the loss is convex, any start is as good
        probe.load_state_dict({k: torch.zeros_like(v) for k, v in probe.state_dict().items()})
        opt = torch.optim.Adam(probe.parameters(), lr=0.05)  # a softmax regression, fitted by full-batch Adam
        for _ in range(300):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(probe(x), y[fit], weight=weight).backward()
            opt.step()
        pred, truth = probe(x_test).argmax(1), y[score]  # balanced accuracy: the mean of the classes' recalls
        stats[f"probe_{name}"] = 100 * float(np.mean([(pred[truth == c] == c).float().mean() for c in truth.unique()]))
    return stats | {"pixels": len(fit) + len(score), "images": n}


SMH = ("seen_miou", "unseen_miou", "harmonic_miou")
SCORED_STAGES = ("train", "transfer", "self_training")  # the stages of a metrics.json
SEED_FREE = ("out", "resume", "init_from", "device", "quiet", "seed")  # settings the runs of a name may differ in
TEMPERATURES = (0.5, 1, 2, 4, 8)  # Fig. 5's AST temperatures: runs sign-ast-T<T>
# (claim, (run, stage) of A, and of B, test "first" or "new", key); paired by seed, A - B cancels what a seed shares
CLAIMS = [("SIGN > ZS3Net (Table 1)", ("sign", "transfer"), ("zs3net", "transfer"), "first", "harmonic_miou"),
    ("SIGN + AST > SIGN (Table 1)", ("sign-ast-T2", "self_training"), ("sign", "transfer"), "first", "harmonic_miou"),
    ("RPE > APE at a new size (Table 3)", ("sign", "transfer"), ("pe-ape", "transfer"), "new", "harmonic_miou"),
    ("RPE > APE at a new size, sky/water (Table 3)", ("sign", "transfer"), ("pe-ape", "transfer"), "new", "sky+water"),
    ("SIM helps seen classes (Table 4)", ("sign", "train"), ("zs3net", "train"), "first", "seen_miou"),
    ("AST > ST (Fig. 5)", ("sign-ast-T2", "self_training"), ("sign-st", "self_training"), "first", "harmonic_miou")]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # Student's t, 97.5 % quantile, by degrees of freedom


def read_metrics(run_dir: Path, name: str = "metrics.json") -> dict:
    path = run_dir / name
    try:
        out = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected train.py's {name}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path} holds {json.dumps(out)[:40]}; expected train.py's {name}, a JSON object")
    return out


def collect_runs(root) -> dict[str, dict[int, dict]]:
    """``{name: {seed: metrics.json}}`` of ``root/<name>/seed<k>``, less the runs unlike most (noted on stderr)."""
    found, metrics, why = {}, {}, {}  # {(name, seed): run folder}, {run folder: metrics}, {run folder: why left out}
    for path in sorted(Path(root).glob("*/seed*/metrics.json")):
        run, k = path.parent, path.parent.name[4:]
        if not (k.isascii() and k.isdigit()):
            raise ValueError(f"{run}: run folders must be named seed<k>, k an integer")
        if (key := (run.parent.name, int(k))) in found:
            raise ValueError(f"{found[key]} and {run} are both seed {int(k)} of {run.parent.name}; keep one")
        found[key], m = run, metrics.setdefault(run, read_metrics(run))
        try:  # what the tables read: a KeyError, TypeError or AttributeError where train.py's layout is not
            why[run] = ", ".join([f"stage {s!r} unknown" for s in m if s not in SCORED_STAGES] + [
                f"{s} {t} {key} is {v}" for s, tests in m.items() for t, r in tests.items()
                for key, v in [*((key, r[key]) for key in SMH), *r["per_class"].items()] if not np.isfinite(v)])
        except (AttributeError, KeyError, TypeError) as e:
            why[run] = f"not train.py's {{stage: {{test set: {{S, U, H, per_class}}}}}}: {type(e).__name__} {e}"
    def leave_out_the_odd(values: dict, reason):  # {run: value}: the runs whose value is not the most common
        common = json.loads(statistics.mode(json.dumps(v, sort_keys=True) for v in values.values())) if values else None
        why.update({r: reason(v, common) for r, v in values.items() if v != common})
    leave_out_the_odd({r: sorted({t for s in m.values() for t in s}) for r, m in metrics.items() if not why[r] and m},
                      lambda v, common: f"test sets {v}, most runs' {common}")
    for name in {name for name, _ in found}:
        leave_out_the_odd({r: {k: v for k, v in read_metrics(r, "config.json").items() if k not in SEED_FREE}
                           for (n, _), r in found.items() if n == name and not why[r] and (r / "config.json").exists()},
                          lambda v, c: "settings unlike most runs of its name: " + ", ".join(
                              f"{k} {v.get(k)!r}" for k in sorted(v.keys() | c.keys()) if v.get(k) != c.get(k)))
    for run in filter(why.get, found.values()):
        print(f"tables: left out {run}: {why[run]}", file=sys.stderr)
    kept = [(name, seed, run) for (name, seed), run in found.items() if not why[run]]  # in found's (path) order
    return {name: {s: metrics[r] for n, s, r in kept if n == name} for name, _, _ in kept}


def mean_std(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=float)
    return "–" if len(v) == 0 else f"{v.mean():.2f}" + (f" ± {v.std(ddof=1):.2f}" if len(v) > 1 else "")


def _by_seed(runs: dict, name: str, stage: str | None, test: str, key: str) -> dict[int, float]:
    stage, classes = stage or final_stage(runs, name), key.split("+")
    at = {seed: m.get(stage, {}).get(test) for seed, m in runs.get(name, {}).items()}  # None: not in that run
    if key.endswith("_miou"):
        return {seed: m[key] for seed, m in at.items() if m}
    return {seed: float(np.mean([m["per_class"][c] for c in classes])) for seed, m in at.items()
            if m and all(c in m["per_class"] for c in classes)}


def final_stage(runs: dict, name: str) -> str:
    return "self_training" if any("self_training" in m for m in runs.get(name, {}).values()) else "transfer"


def reproduction_tables(root) -> str:
    root, runs = Path(root), collect_runs(root)
    if not runs:
        raise ValueError(f"no run folders <name>/seed<k>/metrics.json under {root}")
    tests = sorted({t for r in runs.values() for m in r.values() for s in m.values() for t in s},
                   key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))  # "64" before "128"
    n = lambda name, stage: len(_by_seed(runs, name, stage, tests[0], "seen_miou"))  # seeds that finished stage
    markdown = lambda head, rows: "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])
    def cell(name, stage, t, key):  # a cell averaging fewer seeds than its row's "runs" says so
        v = list(_by_seed(runs, name, stage, t, key).values())
        return mean_std(v) + (f" (n = {len(v)})" if len(v) != n(name, stage) else "")
    def sim_params(name):  # SIM's parameter count (state-dict keys 'SIM.*'), from the run's first checkpoint
        paths = sorted(root.glob(f"{name}/seed*/checkpoint_train.pt"))
        state = read_checkpoint(paths[0])["model"] if paths else {}
        return f"{sum(v.numel() for k, v in state.items() if k.startswith('SIM.')) / 1e3:.1f}k" if paths else "–"
    def table(title, first, stage, keys, rows, with_sim=False):  # a row per run; stage None: the run's last
        short = {"seen_miou": "seen", "unseen_miou": "unseen", "harmonic_miou": "H", "sky+water": "sky/water"}
        head = [first, "runs"] + ["SIM parameters"] * with_sim + [f"{short[k]} {t}" for t in tests for k in keys]
        body = [[label, str(n(name, stage))] + ([sim_params(name)] if with_sim else [])
                + [cell(name, stage, t, k) for t in tests for k in keys] for label, name in rows.items()]
        return [f"\n**{title[0]}** ({title[1]})\n", markdown(head, body)]

    sims = {sim: f"sim-{sim}" for sim in ("conv", "attention", "self-attention")} | {"multihead": "sign"}
    out = [f"Seeds found: {sorted({s for r in runs.values() for s in r})}. Cells: mean ± sample standard "
           "deviation over the seeds that finished the row's stage (runs = how many)."]
    out += table(("Table 1", "seen / unseen / harmonic mIoU, %, per test size"), "method", None, SMH, {
        "ZS3Net": "zs3net", "ZS3Net + ST": "zs3net-st", "CaGNet": "cagnet", "CaGNet + ST": "cagnet-st", "SIGN": "sign",
        "SIGN + ST": "sign-st", "SIGN + AST (T = 2)": "sign-ast-T2"})
    out += table(("Table 2", "SIM architecture, after the transfer step"), "SIM", "transfer", ("harmonic_miou",), sims,
                 with_sim=True)
    out += table(("Table 3", "positional encoding, after the transfer step; sky/water = mean IoU of the two"), "PE",
                 "transfer", SMH + ("sky+water",),
                 {"none": "pe-none", "APE": "pe-ape", "APE + interp.": "pe-ape-interp", "RPE": "sign"})
    columns = {"w/o SIM": "zs3net"} | sims  # Table 4: a column per run, a row per test size
    out += ["\n**Table 4** (seen mIoU before the transfer step; runs: "
            + ", ".join(f"{label} {n(name, 'train')}" for label, name in columns.items()) + ")\n",
            markdown(["test", *columns],
                     [[t] + [cell(name, "train", t, "seen_miou") for name in columns.values()] for t in tests])]
    out += table(("Fig. 5", "SIGN self-training: harmonic mIoU by temperature"), "self-training", "self_training",
                 ("harmonic_miou",), {"ST": "sign-st"} | {f"AST, T = {t:g}": f"sign-ast-T{t:g}" for t in TEMPERATURES})
    sizes, rows = {"first": tests[0], "new": "128" if "128" in tests else tests[-1]}, []  # the claims, a row each
    for claim, (a, stage_a), (b, stage_b), size, key in CLAIMS:
        va, vb = (_by_seed(runs, name, stage, sizes[size], key) for name, stage in ((a, stage_a), (b, stage_b)))
        seeds = sorted(set(va) & set(vb))
        head = [claim, sizes[size], key.replace("_miou", "").replace("+", "/"), str(len(seeds))]
        if len(seeds) < 2:
            rows.append(head + ["–"] * 5 + [f"needs >= 2 seeds with both {a} and {b}"])
            continue
        A, B = [va[s] for s in seeds], [vb[s] for s in seeds]
        p = paired_difference(A, B)
        rows.append(head + [mean_std(A), mean_std(B), f"{p['mean']:+.2f} ± {p['se']:.2f}",
                            f"[{p['low']:+.2f}, {p['high']:+.2f}]", f"{p['agree']} of {p['n']}", p["reading"]])
    out += ["\n**Claims**, paired by seed (A - B per seed: mean ± standard error, 95 % t interval, seeds with "
            "A > B)\n", markdown(["claim", "test", "metric", "seeds", "A", "B", "A - B", "95 % interval", "A > B",
                                "reading"], rows)]
    return "\n".join(out)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired A - B over n >= 2 seeds: mean, standard error, 95 % t interval, seeds with A > B, what that reads as."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        raise ValueError(f"paired_difference needs >= 2 paired seeds, got {len(d)}")
    se = d.std(ddof=1) / np.sqrt(len(d))
    half = T_975[max(k for k in T_975 if k <= len(d) - 1)] * se  # a tabulated df <= n - 1: never narrower than exact
    low, high = float(d.mean() - half), float(d.mean() + half)
    return dict(n=len(d), mean=float(d.mean()), se=float(se), low=low, high=high, agree=int((d > 0).sum()),
                reading="supported" if low > 0 else "contradicted" if high < 0 else "not supported")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score a train.py checkpoint, draw its predictions, or tabulate runs.")
    a = p.add_argument
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help="a checkpoint_<stage>.pt written by train.py")
    what.add_argument("--tables", type=Path, metavar="DIR", help="write DIR/tables.md (Tables 1-4, Fig. 5, the "
                      "paired claims) from the run folders DIR/<name>/seed<k> of train.py --reproduce DIR")
    a("--dataset", choices=sorted(data.DATASETS), help="test dataset; default: the checkpoint's")
    a("--data-root", help="folder holding the real dataset (README 'Datasets'); default: the checkpoint's")
    a("--size", type=int, nargs="+", help="shapes: render sizes; real data with --eval-res feature: the warp size; "
      "default: the checkpoint's (paper: 513)")
    a("--eval-res", choices=EVAL_RES, help="full: logits upsampled to the label; feature: 513 warp scored at the "
      "feature map (the lineage); default: the checkpoint's")
    a("--num-test", type=int, nargs="+", help="shapes: test images, one count or one per size; default: checkpoint's")
    a("--test-seed", type=int, default=0, help="shapes: scene seed of the test sets; 0 (default): the benchmark's, "
      "others draw independent test sets of the same task (test-sampling noise)")
    a("--device", help="default: cuda if available, else cpu")
    a("--save-predictions", type=int, default=0, metavar="N", help="write N PNG panels per test set (default: 0)")
    a("--out", type=Path, help="folder of the panels or --image pictures (default: <checkpoint folder>/predictions)")
    a("--image", type=Path, nargs="+", metavar="PATH", help="instead of scoring: predict on these image files, any "
      "size, write <out>/<stem>.png (image | prediction overlaid, legend) and print each class's share")
    a("--max-side", type=int, default=512, metavar="PIXELS", help="--image: predict at this longer side where the "
      "image's is longer (default 512, the paper's test scale; attention memory grows with its square; 0: never)")
    a("--latent-stats", type=int, nargs="?", const=400, metavar="IMAGES", help="instead of scoring: what SIM's z "
      "carries on the first IMAGES training images (default 400; README 'What z carries')")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.tables:
            tables = reproduction_tables(args.tables)
            (args.tables / "tables.md").write_text(tables + "\n")
            print(tables + f"\n\nwritten to {args.tables / 'tables.md'}")
            return 0
        for flag, low in {"--save-predictions": 0, "--size": 8, "--num-test": 1, "--test-seed": 0, "--latent-stats": 1,
                          "--max-side": 0}.items():
            values = getattr(args, flag[2:].replace("-", "_"))  # a number, a list of them, or None: not given
            if values is not None and min(np.ravel(values)) < low:
                raise ValueError(f"{flag} must be >= {low}, got {' '.join(map(str, np.ravel(values)))}")
        device = choose_device(args.device)
        model, ckpt = load_checkpoint(args.checkpoint, device)
        saved, S, out = ckpt["args"], model.num_seen, args.out or args.checkpoint.parent / "predictions"
        try:  # before any work, a file in the first folder of out that exists (root may create folders in /proc)
            if args.image or args.save_predictions:
                tempfile.TemporaryFile(dir=next(p for p in (out, *out.parents) if p.exists())).close()
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write files into this folder ({e.strerror or e})") from None
        if args.image:  # with the checkpoint's classes, normalisation and resolution rule
            kind, names = data.DATASETS[saved["dataset"]], ckpt["class_names"]
            for path, shares, note in predict_images(
                    model, args.image, out, class_names=names, num_seen=S, mean=kind.mean, std=kind.std, device=device,
                    size=saved["test_sizes"][0] if saved["eval_res"] == "feature" else None, max_side=args.max_side,
                    palette=data.Shapes("test", num_images=1).palette if kind is data.Shapes else None):
                print(f"{path}{note and f' ({note})'}: " + ", ".join(
                    f"{n}{' (unseen)' * (names.index(n) >= S)} {v:.1f} %" for n, v in shares.items()))
            return 0
        dataset, root, eval_res = (getattr(args, k) or saved[k] for k in ("dataset", "data_root", "eval_res"))
        run = saved if dataset == saved["dataset"] else {}  # the run's test sizes belong to its dataset only
        sets = test_sets(dataset, root=root, eval_res=eval_res, layout=saved["layout"], seed=args.test_seed,
                         sizes=args.size or run.get("test_sizes"), num_images=args.num_test or run.get("num_test"))
        first = next(iter(sets.values()))
        if first.num_seen != S:
            raise CheckpointError(f"checkpoint {args.checkpoint} has {model.config['num_classes']} classes ({S} "
                                  f"seen) but {dataset} has {len(first.class_names)} ({first.num_seen} seen)")
        names, label_map = scored_classes(ckpt["class_names"], first.class_names, S)
        if n := args.latent_stats:  # on whole images of the training split of the dataset scored
            shapes = dict(size=saved["crop_size"], num_images=n, layout=saved["layout"]) if dataset == "shapes" else {}
            train_set = data.build_dataset(dataset, "train", root=root, **shapes)
            z = latent_statistics(model, train_set, num_images=n, device=device)
            print(f"latent z of {args.checkpoint} (alpha {saved['alpha']}, latent path {model.config['latent_path']}"
                  f"), {z['pixels']} seen pixels of {z['images']} {dataset} training images: mean mu^2 {z['mu2']:.3g}, "
                  f"mean sigma^2 {z['sigma2']:.4g}, SNR var(mu)/E[sigma^2] median {z['snr_median']:.3g} max "
                  f"{z['snr_max']:.3g}; linear probe of the seen class (balanced accuracy) from z {z['probe_z']:.1f} "
                  f"%, from N(0, 1) noise {z['probe_noise']:.1f} %, from mu {z['probe_mu']:.1f} % (the ceiling)")
            return 0
        print(f"evaluate: {args.checkpoint} (stage {ckpt['stage']}, iteration {ckpt['iteration']}); "
              f"dataset {dataset}, test sets {list(sets)}, eval_res {eval_res}, device {device}")
        evaluate_sets(model, sets, class_names=names, num_seen=S, device=device, eval_res=eval_res, label_map=label_map,
                      batch_size=saved["batch_size"], workers=saved["workers"], title=ckpt["stage"])
        for name, ds in sets.items() if args.save_predictions > 0 else ():
            paths = save_panels(model, ds, out / name, args.save_predictions, class_names=names, num_seen=S,
                                device=device, label_map=label_map)
            print(f"wrote {len(paths)} panels to {out / name}")
    except (CheckpointError, data.DatasetError, ValueError, OSError) as e:  # OSError: a file that cannot be written
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
