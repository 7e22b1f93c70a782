"""Annealed Self-Training (Eq. 17) and the ZS3Net self-training baseline it replaces.

After the transfer step the model labels the unlabelled pixels of the training images
with unseen classes. ZS3Net's self-training (ST) keeps the most confident 75 % of these
pseudo-labels per class, each with loss weight 1. Annealed Self-Training (AST) keeps all of
them and weights each by an annealed softmax of its confidence, scaled so the most
confident pseudo-label weighs 1 (Eq. 17).

Reading order
    annealed_weights   Eq. (17): w_i = softmax(p / T)_i / Z, with max w = 1
    pseudo_labels      the whole policy for a batch: who is eligible, which label, what weight

Symbols
    p_i         confidence of pixel i: the softmax probability of its predicted class
    T           annealing temperature (the paper's best: 2)
    Z           normaliser so that max_i w_i = 1
    w_i         loss weight of pseudo-labelled pixel i
    keep        fraction of pseudo-labels ST keeps per unseen class (ZS3Net: 0.75)

Deliberate choices (the paper leaves these open)
    * Eligible pixels: training label is ignore (255, which includes the unseen classes'
      pixels) and the predicted class is unseen, inside the image: a random crop's padding
      is also 255 but holds no image, so ``padding`` excludes it. Labelled pixels keep their
      label and weight 1 (the paper: "the loss weights of seen classes are always 1");
      everything else is ignored with weight 0.
    * The softmax of Eq. (17) runs over the eligible pixels of one image by default
      (``softmax_over="image"``), so every image's most confident pseudo-label weighs 1
      whatever the rest of the batch holds; ``softmax_over="batch"`` runs it over the batch.
    * ST keeps ceil(keep * n) of the n eligible pixels predicted as each unseen class,
      ranked over the whole batch, so a class with a single pseudo-label keeps it.
"""
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["annealed_weights", "pseudo_labels"]


def annealed_weights(confidence: Tensor, *, T: float = 2.0) -> Tensor:
    """Loss weights of Eq. (17) for the confidences ``confidence`` (any shape), same shape.

    w_i = exp(p_i / T) / sum_j exp(p_j / T) / Z with Z = max_i of that softmax, so max w = 1.
    Z cancels the denominator: w_i = exp(p_i / T) / exp(max_j p_j / T) = exp((p_i - max_j p_j) / T),
    which is what we compute. It never overflows, since every exponent is <= 0.
    The softmax runs over all elements of ``confidence``. Empty input gives empty output.
    """
    if T <= 0:
        raise ValueError(f"annealed_weights: temperature T must be positive, got {T}")
    if confidence.numel() == 0:
        return confidence.clone()
    return torch.exp((confidence - confidence.max()) / T)  # Eq. (17)


def pseudo_labels(
    probs: Tensor, label: Tensor, *, unseen: Sequence[int], mode: str, T: float = 2.0,
    keep: float = 0.75, ignore_index: int = 255, softmax_over: str = "image", padding: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pseudo-labels and per-pixel loss weights for one batch: ST (ZS3Net) or AST (Eq. 17).

    probs (B, K, H, W) softmax outputs of the model, label (B, H, W) training labels;
    ``padding`` (B, H, W) bool marks pixels outside the image (a random crop's padding), which
    are never eligible: they are not unlabelled pixels of the image.
    Returns ``target`` (B, H, W) long and ``weight`` (B, H, W) float:
      labelled pixels            -> their label, weight 1
      eligible pixels (see module docstring), mode "st"  -> the predicted unseen class,
          weight 1, only the most confident ceil(keep * n) per unseen class
      eligible pixels, mode "ast" -> the predicted unseen class, weight from Eq. (17)
      every other pixel          -> ignore_index, weight 0
    """
    if probs.dim() != 4 or label.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"pseudo_labels: expected probs (B, K, H, W) and label (B, H, W), "
                         f"got {tuple(probs.shape)} and {tuple(label.shape)}")
    if padding is not None and (padding.shape != label.shape or padding.dtype != torch.bool):
        raise ValueError(f"pseudo_labels: padding must be a bool mask shaped like label {tuple(label.shape)}, "
                         f"got {padding.dtype} {tuple(padding.shape)}")
    if mode not in ("st", "ast"):
        raise ValueError(f"pseudo_labels: mode must be 'st' or 'ast', got {mode!r}")
    if softmax_over not in ("image", "batch"):
        raise ValueError(f"pseudo_labels: softmax_over must be 'image' or 'batch', got {softmax_over!r}")
    if not 0 < keep <= 1:
        raise ValueError(f"pseudo_labels: keep must be in (0, 1], got {keep}")
    B, K, H, W = probs.shape
    if any(not 0 <= c < K for c in unseen):
        raise ValueError(f"pseudo_labels: unseen classes {list(unseen)} must lie in 0..{K - 1}")

    confidence, predicted = probs.max(dim=1)  # (B, H, W) each
    unseen_t = torch.as_tensor(list(unseen), dtype=predicted.dtype, device=predicted.device)
    eligible = (label == ignore_index) & torch.isin(predicted, unseen_t)  # (B, H, W)
    if padding is not None:
        eligible &= ~padding

    labelled = label != ignore_index
    weight = labelled.to(probs.dtype)  # seen-class pixels always weigh 1
    selected = torch.zeros_like(eligible)
    if mode == "st":
        for c in unseen:
            candidates = (eligible & (predicted == c)).flatten().nonzero(as_tuple=True)[0]
            if candidates.numel() == 0:
                continue
            k = math.ceil(keep * candidates.numel())
            top = confidence.flatten()[candidates].topk(k).indices
            selected.view(-1)[candidates[top]] = True
        weight = weight + selected.to(probs.dtype)
    else:
        selected = eligible
        if softmax_over == "batch":
            weight[eligible] = annealed_weights(confidence[eligible], T=T)  # Eq. (17)
        else:
            for b in range(B):
                weight[b][eligible[b]] = annealed_weights(confidence[b][eligible[b]], T=T)  # Eq. (17)

    target = torch.where(selected, predicted, label)
    target = torch.where(labelled | selected, target, torch.full_like(label, ignore_index))
    return target, weight
