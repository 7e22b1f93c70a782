"""Specification of mmd.py: the class-wise Maximum Mean Discrepancy of Eqs. (5)-(6)."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from mmd import DEFAULT_SIGMAS, classwise_mmd, gaussian_kernel, mmd

pytestmark = pytest.mark.mmd

SIGMAS = (0.5, 1.0, 3.0)


@st.composite
def feature_sets(draw, max_rows=8, max_dim=5):
    """Two float64 sets (N, D), (M, D) of bounded values and a seed-derived layout."""
    D = draw(st.integers(1, max_dim))
    N, M = draw(st.integers(1, max_rows)), draw(st.integers(1, max_rows))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * 2
    y = torch.randn(M, D, generator=g, dtype=torch.float64) * 2 + 1
    return x, y


def loop_kernel(a, b, sigmas):
    return sum(math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b)) / (2 * s * s)) for s in sigmas)


def loop_mmd(x, y, sigmas):
    """Eq. (6) written as three double loops, each sum divided by its number of terms."""
    x, y = x.tolist(), y.tolist()
    kxx = sum(loop_kernel(a, b, sigmas) for a in x for b in x) / len(x) ** 2
    kyy = sum(loop_kernel(a, b, sigmas) for a in y for b in y) / len(y) ** 2
    kxy = sum(loop_kernel(a, b, sigmas) for a in x for b in y) / (len(x) * len(y))
    return kxx + kyy - 2 * kxy


@given(feature_sets())
def test_kernel_equals_the_loop_oracle(sets):
    x, y = sets
    K = gaussian_kernel(x, y, sigmas=SIGMAS)
    assert K.shape == (len(x), len(y))
    oracle = torch.tensor([[loop_kernel(a, b, SIGMAS) for b in y.tolist()] for a in x.tolist()],
                          dtype=torch.float64)
    torch.testing.assert_close(K, oracle, rtol=1e-9, atol=1e-12)


def test_single_unit_bandwidth_is_the_papers_kernel():
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(gaussian_kernel(x, y, sigmas=(1.0,)),
                               torch.tensor([[math.exp(-0.5 * 25.0)]], dtype=torch.float64))


@given(feature_sets())
def test_mmd_equals_the_double_loop_oracle(sets):
    x, y = sets
    assert mmd(x, y, sigmas=SIGMAS).item() == pytest.approx(loop_mmd(x, y, SIGMAS), rel=1e-9, abs=1e-12)


@given(feature_sets())
def test_mmd_is_symmetric_and_non_negative(sets):
    x, y = sets
    d = mmd(x, y, sigmas=SIGMAS)
    assert d.item() >= -1e-12
    torch.testing.assert_close(d, mmd(y, x, sigmas=SIGMAS))


@given(feature_sets())
def test_mmd_is_zero_for_identical_sets(sets):
    x, _ = sets
    assert abs(mmd(x, x, sigmas=SIGMAS).item()) < 1e-12


@given(feature_sets(), st.integers(0, 1000))
def test_mmd_is_invariant_to_row_permutations(sets, seed):
    x, y = sets
    g = torch.Generator().manual_seed(seed)
    px, py = torch.randperm(len(x), generator=g), torch.randperm(len(y), generator=g)
    torch.testing.assert_close(mmd(x[px], y[py], sigmas=SIGMAS), mmd(x, y, sigmas=SIGMAS))


@given(feature_sets(), st.floats(-5, 5))
def test_mmd_is_invariant_to_a_common_translation(sets, shift):
    x, y = sets
    torch.testing.assert_close(mmd(x + shift, y + shift, sigmas=SIGMAS), mmd(x, y, sigmas=SIGMAS),
                               rtol=1e-7, atol=1e-10)


def test_mmd_grows_as_one_sets_mean_moves_away():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.randn(64, 3, generator=g, dtype=torch.float64)
    values = [mmd(x, y + t, sigmas=SIGMAS).item() for t in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_mmd_gradient_is_finite_when_the_sets_are_equal():
    x = torch.randn(6, 4, dtype=torch.float64)
    y = x.clone().requires_grad_(True)
    mmd(x, y, sigmas=SIGMAS).backward()
    assert torch.isfinite(y.grad).all()


def test_default_bandwidths_keep_a_gradient_where_the_papers_kernel_vanishes():
    """Features of dimension 64 sit too far apart for exp(-||f - f'||^2 / 2) (PROTOCOL section 7)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(32, 64, generator=g)
    fake = (torch.randn(32, 64, generator=g) + 1.0).requires_grad_(True)
    mmd(real, fake, sigmas=(1.0,)).backward()
    assert fake.grad.abs().max() < 1e-12
    fake.grad = None
    mmd(real, fake, sigmas=DEFAULT_SIGMAS).backward()
    assert fake.grad.abs().max() > 1e-4


def test_mismatched_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="feature dim 5 but y has 4"):
        mmd(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        gaussian_kernel(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="positive"):
        gaussian_kernel(torch.zeros(2, 2), torch.zeros(2, 2), sigmas=(0.0,))
    with pytest.raises(ValueError, match="labels must be"):
        classwise_mmd(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="real and fake"):
        classwise_mmd(torch.zeros(4, 2), torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), [0])


@st.composite
def labelled_features(draw):
    N = draw(st.integers(1, 24))
    labels = torch.tensor(draw(st.lists(st.sampled_from([0, 1, 2, 3, 255]), min_size=N, max_size=N)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    real = torch.randn(N, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(N, 3, generator=g, dtype=torch.float64) + 0.5
    classes = draw(st.lists(st.sampled_from([0, 1, 2, 3]), unique=True))
    return real, fake, labels, classes


@given(labelled_features())
def test_classwise_mmd_equals_a_per_class_loop(data):
    real, fake, labels, classes = data
    expected = 0.0
    for c in classes:
        rows = [i for i, l in enumerate(labels.tolist()) if l == c]
        if rows:
            expected += loop_mmd(real[rows], fake[rows], SIGMAS)
    got = classwise_mmd(real, fake, labels, classes, sigmas=SIGMAS, max_per_class=1000)
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_classwise_mmd_skips_absent_classes_and_the_ignore_label():
    real = torch.randn(6, 2, dtype=torch.float64)
    fake = torch.randn(6, 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 255, 255, 1, 1])
    only_zero = classwise_mmd(real, fake, labels, [0], sigmas=SIGMAS)
    with_absent = classwise_mmd(real, fake, labels, [0, 7, 255], sigmas=SIGMAS)
    torch.testing.assert_close(with_absent, only_zero)
    torch.testing.assert_close(only_zero, mmd(real[:2], fake[:2], sigmas=SIGMAS))


def test_classwise_mmd_with_no_class_present_is_a_zero_that_backpropagates():
    fake = torch.randn(5, 3, requires_grad=True)
    loss = classwise_mmd(torch.randn(5, 3), fake, torch.full((5,), 255), [0, 1])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(fake.grad, torch.zeros_like(fake))


def test_classwise_mmd_respects_max_per_class():
    """With max_per_class = 1 each class is one pixel whose real and fake rows are paired."""
    torch.manual_seed(0)
    real = torch.randn(50, 2, dtype=torch.float64)
    labels = torch.zeros(50, dtype=torch.long)
    # One real/fake pair: MMD = 2 k(f, f) - 2 k(f, f^) = 2 * 3 - 2 * k(f, f + 1). Every pair
    # gives the same value because fake is a constant shift of real.
    fake = real + 1.0
    shift = torch.ones(1, 2, dtype=torch.float64)
    expected = 2 * len(SIGMAS) - 2 * gaussian_kernel(torch.zeros(1, 2, dtype=torch.float64), shift, sigmas=SIGMAS)
    got = classwise_mmd(real, fake, labels, [0], sigmas=SIGMAS, max_per_class=1)
    torch.testing.assert_close(got, expected[0, 0])
    # With all 50 pixels, the within-set kernel terms are no longer trivially 3.
    assert not torch.isclose(classwise_mmd(real, fake, labels, [0], sigmas=SIGMAS, max_per_class=50), got)


def test_classwise_mmd_subsamples_the_same_pixels_of_real_and_fake():
    """If real and fake agree pixel by pixel, every subsample gives MMD exactly zero."""
    real = torch.randn(300, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (300,))
    assert abs(classwise_mmd(real, real.clone(), labels, [0, 1, 2], sigmas=SIGMAS, max_per_class=10).item()) < 1e-12


def test_classwise_mmd_draws_its_subsample_at_random():
    """Which pixels stand for a crowded class changes from call to call (torch RNG)."""
    torch.manual_seed(0)
    real = torch.randn(40, 2, dtype=torch.float64)
    fake = real + torch.linspace(0, 3, 40, dtype=torch.float64)[:, None]  # each pixel its own gap
    labels = torch.zeros(40, dtype=torch.long)
    values = {round(classwise_mmd(real, fake, labels, [0], sigmas=SIGMAS, max_per_class=1).item(), 9)
              for _ in range(20)}
    assert len(values) > 1
