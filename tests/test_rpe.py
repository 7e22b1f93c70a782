"""Specification of rpe.py: the positional encodings of Eqs. (11)-(16) and the Table 3 ablations."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from rpe import (absolute_positional_encoding, interpolated_absolute_positional_encoding,
                 relative_positional_encoding)

pytestmark = pytest.mark.rpe

sizes = st.integers(min_value=1, max_value=12)
dims = st.sampled_from([4, 8, 12, 16, 40])


def loop_rpe(H: int, W: int, dim: int, c: float, relative: bool = True) -> torch.Tensor:
    """Eqs. (11)-(16) written out one pixel and one channel at a time, in float64."""
    d_model = dim // 2
    pe = torch.zeros(dim, H, W, dtype=torch.float64)
    for v in range(H):
        for u in range(W):
            pos_u = c * u / W if relative else u
            pos_v = c * v / H if relative else v
            for d in range(d_model // 2):
                div = 10000 ** (2 * d / d_model)
                pe[2 * d, v, u] = math.sin(pos_u / div)
                pe[2 * d + 1, v, u] = math.cos(pos_u / div)
                pe[d_model + 2 * d, v, u] = math.sin(pos_v / div)
                pe[d_model + 2 * d + 1, v, u] = math.cos(pos_v / div)
    return pe


@given(H=sizes, W=sizes, dim=dims, c=st.floats(min_value=1.0, max_value=1024.0))
def test_rpe_equals_the_loop_oracle(H, W, dim, c):
    pe = relative_positional_encoding(H, W, dim=dim, c=c, dtype=torch.float64)
    torch.testing.assert_close(pe, loop_rpe(H, W, dim, c), rtol=0, atol=1e-12)


@given(H=sizes, W=sizes, dim=dims)
def test_ape_equals_the_loop_oracle(H, W, dim):
    pe = absolute_positional_encoding(H, W, dim=dim, dtype=torch.float64)
    torch.testing.assert_close(pe, loop_rpe(H, W, dim, 0.0, relative=False), rtol=0, atol=1e-12)


@given(H=sizes, W=sizes, dim=dims)
def test_rpe_shape_and_range(H, W, dim):
    pe = relative_positional_encoding(H, W, dim=dim)
    assert pe.shape == (dim, H, W)
    assert pe.dtype == torch.get_default_dtype()
    assert pe.abs().max() <= 1.0


@given(H=sizes, W=sizes, dim=dims)
def test_every_sin_cos_pair_lies_on_the_unit_circle(H, W, dim):
    pe = relative_positional_encoding(H, W, dim=dim, dtype=torch.float64)
    pairs = pe[0::2] ** 2 + pe[1::2] ** 2  # (dim/2, H, W)
    torch.testing.assert_close(pairs, torch.ones_like(pairs), rtol=0, atol=1e-12)


@given(H=sizes, W=sizes, dim=dims)
def test_horizontal_half_is_constant_along_v_and_vertical_half_along_u(H, W, dim):
    pe = relative_positional_encoding(H, W, dim=dim)
    horizontal, vertical = pe[: dim // 2], pe[dim // 2:]
    assert torch.equal(horizontal, horizontal[:, :1, :].expand_as(horizontal))
    assert torch.equal(vertical, vertical[:, :, :1].expand_as(vertical))


def test_first_horizontal_channels_are_sin_and_cos_of_the_relative_position():
    pe = relative_positional_encoding(2, 4, dim=8, c=512.0, dtype=torch.float64)
    u = torch.arange(4, dtype=torch.float64)
    torch.testing.assert_close(pe[0, 0], torch.sin(512.0 * u / 4))
    torch.testing.assert_close(pe[1, 1], torch.cos(512.0 * u / 4))
    v = torch.arange(2, dtype=torch.float64)
    torch.testing.assert_close(pe[4, :, 3], torch.sin(512.0 * v / 2))


@given(H=sizes, W=sizes, k=st.integers(min_value=2, max_value=4), dim=dims)
def test_rpe_is_size_invariant(H, W, k, dim):
    """Pixel (k v, k u) of a (k H, k W) map is encoded exactly as pixel (v, u) of an (H, W) map."""
    small = relative_positional_encoding(H, W, dim=dim, dtype=torch.float64)
    large = relative_positional_encoding(k * H, k * W, dim=dim, dtype=torch.float64)
    torch.testing.assert_close(large[:, ::k, ::k], small, rtol=0, atol=1e-9)


def test_ape_is_not_size_invariant():
    small = absolute_positional_encoding(8, 8, dim=16)
    large = absolute_positional_encoding(16, 16, dim=16)
    assert (large[:, ::2, ::2] - small).abs().max() > 0.1


def test_endpoint_variant_follows_the_lineage_grid_and_is_off_by_default():
    H, W, c = 3, 5, 512.0
    pe = relative_positional_encoding(H, W, dim=8, c=c, endpoint=True, dtype=torch.float64)
    u = torch.linspace(0, c - 1, W, dtype=torch.float64)
    torch.testing.assert_close(pe[0, 0], torch.sin(u))
    assert not torch.allclose(pe, relative_positional_encoding(H, W, dim=8, c=c, dtype=torch.float64))


@given(H=sizes, W=sizes, dim=dims)
def test_interpolated_ape_at_the_training_size_is_ape(H, W, dim):
    interp = interpolated_absolute_positional_encoding(H, W, train_size=(H, W), dim=dim)
    torch.testing.assert_close(interp, absolute_positional_encoding(H, W, dim=dim), rtol=0, atol=1e-6)


def test_interpolated_ape_resizes_the_training_size_table():
    pe = interpolated_absolute_positional_encoding(16, 12, train_size=(8, 6), dim=8)
    assert pe.shape == (8, 16, 12)
    assert pe.abs().max() <= 1.0
    # Bilinear resizing keeps each horizontal channel constant along v.
    assert torch.allclose(pe[:4], pe[:4, :1, :].expand_as(pe[:4]))
    assert not torch.allclose(pe, absolute_positional_encoding(16, 12, dim=8), atol=1e-3)


def test_encodings_follow_the_requested_device_and_dtype():
    pe = relative_positional_encoding(3, 4, dim=8, device="cpu", dtype=torch.float16)
    assert pe.dtype == torch.float16 and pe.device.type == "cpu"


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=0, width=4), "positive"),
    (dict(height=4, width=-1), "positive"),
    (dict(height=4, width=4, dim=6), "multiple of 4"),
    (dict(height=4, width=4, dim=0), "multiple of 4"),
    (dict(height=4, width=4, c=0.0), "c must be positive"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        relative_positional_encoding(**kwargs)


def test_ape_variants_check_their_arguments_too():
    with pytest.raises(ValueError, match="multiple of 4"):
        absolute_positional_encoding(4, 4, dim=10)
    with pytest.raises(ValueError, match="positive"):
        interpolated_absolute_positional_encoding(0, 4, train_size=(4, 4), dim=8)
