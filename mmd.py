"""Maximum Mean Discrepancy between real and generated features, per class (Eqs. 5-6).

Training Step (G) pulls the generator's synthetic features towards the real features of
the same seen class: L_MMD is the sum over seen classes c of MMD(F_x,c, F^_x,c).

Reading order
    gaussian_kernel   k(f, f') summed over a set of bandwidths (_kernel: the same for stacks of sets)
    _weighted_mmd     Eq. (6) for a stack of set pairs with row weights (padding weighs 0)
    mmd               Eq. (6): the (biased) squared MMD of two sets of features
    classwise_mmd     Eq. (5): the sum of Eq. (6) over the classes present in a batch

Symbols
    F_x,c  / real     (N_c, D) real features of class c (pixels of E -> SIM output)
    F^_x,c / fake     (N_c, D) generated features of class c (G's output at the same pixels)
    k                 gaussian_kernel
    sigma             a kernel bandwidth; ``sigmas`` is the set summed over

Deliberate changes versus the paper
    * Means, not sums: the paper writes Eq. (6) as three plain sums. We divide each by its
      number of terms (N^2, M^2, N M), the usual biased estimator of MMD^2. Plain sums
      would weight a class by the square of its pixel count and make beta depend on the
      crop size. No square root is taken (the lineage takes one; its gradient is infinite
      at MMD = 0).
    * Several bandwidths (``DEFAULT_SIGMAS``) instead of the paper's single
      k(f, f') = exp(-1/2 ||f - f'||^2), which is ``sigmas=(1.0,)``. Features of realistic
      dimension sit far apart: for D-dimensional features with unit-variance coordinates,
      ||f - f'||^2 is about 2D (128 for D = 64, 1200 for D = 600), so exp(-||f - f'||^2 / 2)
      is below 1e-27 for every pair, the three terms of Eq. (6) vanish and G gets no
      gradient. A geometric ladder of bandwidths 1 ... 32 keeps at least one kernel in
      its sensitive range (||f - f'||^2 / 2 sigma^2 between about 0.1 and 5) for squared
      distances from about 0.2 to 10^4: from features that already match closely to
      features that are still far apart, whatever the feature dimension in use.
    * Pixels per class are subsampled (``max_per_class``) so that memory and time stay
      O(max_per_class^2) whatever the crop size; the lineage's code instead groups pixels
      by runs of equal labels in raster order, which is not Eq. (5).
"""
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_SIGMAS", "gaussian_kernel", "mmd", "classwise_mmd"]

DEFAULT_SIGMAS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"{name}: expected 2-D (N, D) feature sets, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{name}: x has feature dim {x.shape[1]} but y has {y.shape[1]}")


def gaussian_kernel(x: Tensor, y: Tensor, *, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> Tensor:
    """k(x_i, y_j) = sum over sigma of exp(-||x_i - y_j||^2 / (2 sigma^2)), shape (N, M).

    ``sigmas=(1.0,)`` is exactly the paper's kernel exp(-1/2 ||f - f'||^2) (Eq. 6).
    """
    _check_pair(x, y, "gaussian_kernel")
    _check_sigmas(sigmas, "gaussian_kernel")
    return _kernel(x, y, sigmas)


def _check_sigmas(sigmas: Sequence[float], name: str) -> None:
    if len(sigmas) == 0 or any(s <= 0 for s in sigmas):
        raise ValueError(f"{name}: sigmas must be a non-empty set of positive numbers, got {sigmas}")


def _kernel(x: Tensor, y: Tensor, sigmas: Sequence[float]) -> Tensor:
    """``gaussian_kernel`` for stacks of sets: x (G, N, D), y (G, M, D) -> (G, N, M) (or unstacked)."""
    # ||x||^2 + ||y||^2 - 2 x.y needs O(N M) memory instead of the O(N M D) of x[:, None] - y;
    # rounding can push it slightly below zero, hence the clamp. It also keeps the gradient
    # finite at x = y, where the gradient of a Euclidean distance (cdist) is not.
    sq_dist = (x.pow(2).sum(-1)[..., :, None] + y.pow(2).sum(-1)[..., None, :]
               - 2 * x @ y.transpose(-1, -2)).clamp_min(0)  # (G, N, M)
    return sum(torch.exp(-sq_dist / (2 * s * s)) for s in sigmas)


def _weighted_mmd(x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Eq. (6) for G pairs of sets at once: x (G, N, D) and y (G, M, D) with row weights wx (G, N),
    wy (G, M) that sum to 1 per set (a padding row weighs 0) -> (G,) squared MMDs."""
    def mean_k(a, wa, b, wb):  # sum_ij wa_i wb_j k(a_i, b_j), (G,)
        return (wa[:, :, None] * _kernel(a, b, sigmas) * wb[:, None, :]).sum((1, 2))
    return mean_k(x, wx, x, wx) + mean_k(y, wy, y, wy) - 2 * mean_k(x, wx, y, wy)  # Eq. (6)


def mmd(x: Tensor, y: Tensor, *, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> Tensor:
    """Squared MMD of two feature sets x (N, D) and y (M, D), a scalar, Eq. (6).

    MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y): Eq. (6) with each sum divided
    by its number of terms (biased estimator, >= 0, zero when the sets are equal).
    """
    _check_pair(x, y, "mmd")
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"mmd: both sets need at least one row, got {len(x)} and {len(y)}")
    _check_sigmas(sigmas, "mmd")
    uniform = lambda n: x.new_full((1, n), 1.0 / n)
    return _weighted_mmd(x[None], y[None], uniform(len(x)), uniform(len(y)), sigmas)[0]


def classwise_mmd(
    real: Tensor, fake: Tensor, labels: Tensor, classes: Sequence[int], *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS, max_per_class: int = 256, ignore_index: int = 255,
) -> Tensor:
    """L_MMD = sum over classes c in ``classes`` present in ``labels`` of MMD(real_c, fake_c), Eq. (5).

    ``real`` and ``fake`` are (N, D) and aligned per pixel with ``labels`` (N,): row i of
    both belongs to the pixel whose class is labels[i]. Pixels labelled ``ignore_index`` never
    count, and classes absent from ``labels`` add nothing. A class with more than
    ``max_per_class`` pixels is represented by that many pixels drawn at random (torch RNG),
    the same pixels for real and fake. With no class present the result is a zero that is
    still connected to ``fake`` and ``real``, so ``backward()`` works on every batch.
    All classes are computed at once, as one padded stack of sets (the same sum, one pass).
    """
    if real.shape != fake.shape or real.dim() != 2:
        raise ValueError(f"classwise_mmd: real and fake must both be (N, D), got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    if labels.shape != (real.shape[0],):
        raise ValueError(f"classwise_mmd: labels must be ({real.shape[0]},) to match the "
                         f"features, got {tuple(labels.shape)}")
    if max_per_class < 1:
        raise ValueError(f"classwise_mmd: max_per_class must be >= 1, got {max_per_class}")
    _check_sigmas(sigmas, "classwise_mmd")
    total = (real.sum() + fake.sum()) * 0.0  # the zero that carries a graph
    sets = []  # the pixel indices of each present class, (N_c,) each
    for c in classes:
        if c == ignore_index:
            continue
        idx = (labels == c).nonzero(as_tuple=True)[0]  # (N_c,)
        if idx.numel() == 0:
            continue
        if idx.numel() > max_per_class:
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[:max_per_class]]
        sets.append(idx)
    if not sets:
        return total
    idx = torch.nn.utils.rnn.pad_sequence(sets, batch_first=True)  # (G, P), padded with pixel 0
    n = torch.tensor([len(i) for i in sets], device=idx.device)  # (G,)
    w = (torch.arange(idx.shape[1], device=idx.device) < n[:, None]).to(real.dtype) / n[:, None]  # (G, P)
    return total + _weighted_mmd(real[idx], fake[idx], w, w, sigmas).sum()  # Eq. (5)
