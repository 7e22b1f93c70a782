"""Positional encodings of a 2-D feature map: Relative Positional Encoding (Eqs. 11-16).

SIM (Eq. 1) concatenates the encoder's features E(x) with a positional encoding PE of the
same height and width. This module computes PE as a pure function of the map's size, so
SIM can recompute it for every input: that is what lets RPE handle any image size.

Reading order
    _sinusoid                                 Eqs. (11)-(14): sin / cos of one coordinate
    relative_positional_encoding              Eqs. (15)-(16): positions scaled by c / W, c / H
    absolute_positional_encoding              APE: the raw pixel index (Table 3 ablation)
    interpolated_absolute_positional_encoding APE at the training size, resized (Table 3)

Symbols
    PE            the (dim, H, W) encoding
    d_model       dim / 2, channels per direction (300 in the paper)
    d             frequency index, channels 2d (sin) and 2d + 1 (cos)
    pos_u, pos_v  horizontal / vertical pixel index u in 0..W-1, v in 0..H-1
    pos*          relative position, c * pos_u / W and c * pos_v / H
    c             the constant 512 of Eqs. (15)-(16)

Layout: channels [0, dim/2) encode the horizontal position u and are constant along v;
channels [dim/2, dim) encode the vertical position v and are constant along u.

Deliberate choices
    * Eqs. (15)-(16) exactly by default. The lineage's code spaces positions as
      linspace(0, c - 1, W), i.e. (c - 1) * u / (W - 1); ``endpoint=True`` reproduces it.
      That variant is not size-invariant in the sense tested here (its grid depends on W - 1).
    * Values are computed in float64 and cast to ``dtype`` at the end: at c = 512 the
      angles reach 512 rad, where float32 rounding of the angle would already show.
"""
import torch
from torch import Tensor
import torch.nn.functional as F

__all__ = [
    "relative_positional_encoding",
    "absolute_positional_encoding",
    "interpolated_absolute_positional_encoding",
]


def _check(height: int, width: int, dim: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"positional encoding: height and width must be positive, got {height}x{width}")
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(f"positional encoding: dim must be a positive multiple of 4 "
                         f"(two directions x sin/cos pairs), got {dim}")


def _sinusoid(pos: Tensor, d_model: int) -> Tensor:
    """Sinusoids of positions ``pos`` (L,) -> (d_model, L), Eqs. (11)-(14) for one direction.

    PE(pos, 2d) = sin(pos / 10000^(2d / d_model)),  PE(pos, 2d + 1) = cos(same angle).
    """
    two_d = torch.arange(0, d_model, 2, dtype=torch.float64, device=pos.device)  # (d_model/2,)
    angle = pos[None, :] / 10000.0 ** (two_d[:, None] / d_model)  # (d_model/2, L)
    pe = torch.empty(d_model, pos.numel(), dtype=torch.float64, device=pos.device)
    pe[0::2] = torch.sin(angle)  # Eq. (11) for u, Eq. (13) for v
    pe[1::2] = torch.cos(angle)  # Eq. (12) for u, Eq. (14) for v
    return pe


def _encode(pos_u: Tensor, pos_v: Tensor, dim: int, dtype: torch.dtype | None) -> Tensor:
    """Stack the horizontal half (constant along v) over the vertical half (constant along u)."""
    W, H = pos_u.numel(), pos_v.numel()
    d_model = dim // 2
    horizontal = _sinusoid(pos_u, d_model)[:, None, :].expand(d_model, H, W)  # (d_model, H, W)
    vertical = _sinusoid(pos_v, d_model)[:, :, None].expand(d_model, H, W)  # (d_model, H, W)
    pe = torch.cat([horizontal, vertical], dim=0)  # (dim, H, W)
    return pe.to(dtype or torch.get_default_dtype())


def relative_positional_encoding(
    height: int, width: int, *, dim: int = 600, c: float = 512.0, endpoint: bool = False,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> Tensor:
    """RPE of an (height, width) feature map, shape (dim, height, width), Eqs. (11)-(16).

    pos*_u = c * u / W and pos*_v = c * v / H (Eqs. 15-16), then the sinusoids of
    Eqs. (11)-(14). Because only u / W and v / H enter, pixel (k v, k u) of a (k H, k W) map
    gets exactly the encoding of pixel (v, u) of an (H, W) map.
    ``endpoint=True`` uses the lineage's (c - 1) * u / (W - 1) instead (0 when W = 1).
    """
    _check(height, width, dim)
    if c <= 0:
        raise ValueError(f"relative_positional_encoding: c must be positive, got {c}")
    u = torch.arange(width, dtype=torch.float64, device=device)
    v = torch.arange(height, dtype=torch.float64, device=device)
    if endpoint:
        pos_u = (c - 1) * u / max(width - 1, 1)
        pos_v = (c - 1) * v / max(height - 1, 1)
    else:
        pos_u = c * u / width  # Eq. (15)
        pos_v = c * v / height  # Eq. (16)
    return _encode(pos_u, pos_v, dim, dtype)


def absolute_positional_encoding(
    height: int, width: int, *, dim: int = 600,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> Tensor:
    """APE, shape (dim, height, width): Eqs. (11)-(14) of the raw pixel index u, v.

    The Table 3 baseline: a pixel's code depends on its index, not on where it sits
    relative to the image, so the same place of a larger image is encoded differently.
    """
    _check(height, width, dim)
    u = torch.arange(width, dtype=torch.float64, device=device)
    v = torch.arange(height, dtype=torch.float64, device=device)
    return _encode(u, v, dim, dtype)


def interpolated_absolute_positional_encoding(
    height: int, width: int, *, train_size: tuple[int, int], dim: int = 600,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> Tensor:
    """APE w/ Inter. (Table 3), shape (dim, height, width).

    APE computed at the training feature size ``train_size = (h, w)`` and resized bilinearly
    to (height, width); at the training size it is APE itself.
    """
    _check(height, width, dim)
    h, w = train_size
    pe = absolute_positional_encoding(h, w, dim=dim, device=device, dtype=torch.float64)
    if (h, w) != (height, width):
        # align_corners=False: the usual resize, the one a ViT-style position table gets.
        pe = F.interpolate(pe[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return pe.to(dtype or torch.get_default_dtype())

