"""Specification of ast_weights.py: Annealed Self-Training weights (Eq. 17) and pseudo-labels."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from ast_weights import annealed_weights, pseudo_labels

pytestmark = pytest.mark.ast

confidences = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40).map(
    lambda v: torch.tensor(v, dtype=torch.float64))
temperatures = st.floats(0.05, 50.0)


def softmax_then_divide(p: torch.Tensor, T: float) -> torch.Tensor:
    """Eq. (17) literally: the annealed softmax, then divided by Z = its maximum."""
    s = torch.softmax(p / T, dim=0)
    return s / s.max()


@given(confidences, temperatures)
def test_the_largest_weight_is_exactly_one(p, T):
    assert annealed_weights(p, T=T).max().item() == 1.0


@given(confidences, temperatures)
def test_weights_lie_in_zero_one(p, T):
    w = annealed_weights(p, T=T)
    assert (w > 0).all() and (w <= 1).all()


@given(confidences, temperatures)
def test_weights_equal_the_softmax_then_divide_form(p, T):
    torch.testing.assert_close(annealed_weights(p, T=T), softmax_then_divide(p, T), rtol=1e-9, atol=1e-300)


@given(confidences, temperatures)
def test_weights_are_monotone_in_confidence(p, T):
    w = annealed_weights(p, T=T)
    order = torch.argsort(p)
    assert (w[order].diff() >= 0).all()


@given(confidences, temperatures, st.floats(-10, 10))
def test_weights_ignore_a_constant_added_to_every_confidence(p, T, shift):
    torch.testing.assert_close(annealed_weights(p + shift, T=T), annealed_weights(p, T=T), rtol=1e-9, atol=1e-12)


@given(confidences, temperatures, st.integers(0, 1000))
def test_weights_are_permutation_equivariant(p, T, seed):
    perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(annealed_weights(p[perm], T=T), annealed_weights(p, T=T)[perm])


def test_high_temperature_flattens_and_low_temperature_sharpens():
    p = torch.tensor([0.2, 0.5, 0.9, 0.91])
    assert (annealed_weights(p, T=1e4) > 0.999).all()
    w = annealed_weights(p, T=1e-3)
    assert w[3] == 1.0 and (w[:3] < 1e-4).all()


def test_weights_keep_the_input_shape_and_handle_empty_input():
    p = torch.rand(2, 3, 4)
    assert annealed_weights(p).shape == (2, 3, 4)
    assert annealed_weights(torch.empty(0)).shape == (0,)


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_non_positive_temperature_is_rejected(T):
    with pytest.raises(ValueError, match="T must be positive"):
        annealed_weights(torch.rand(3), T=T)


# ---- pseudo_labels -------------------------------------------------------------------------

K, UNSEEN = 5, [3, 4]


@st.composite
def batches(draw):
    """Random softmax outputs and training labels (seen 0..2 or ignore; unseen never labelled)."""
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    probs = torch.softmax(3 * torch.randn(B, K, H, W, generator=g, dtype=torch.float64), dim=1)
    label = torch.randint(0, 3, (B, H, W), generator=g)
    label[torch.rand(B, H, W, generator=g) < 0.6] = 255
    return probs, label


@given(batches(), st.sampled_from(["st", "ast"]))
def test_labelled_pixels_keep_their_label_and_weight_one(batch, mode):
    probs, label = batch
    target, weight = pseudo_labels(probs, label, unseen=UNSEEN, mode=mode)
    labelled = label != 255
    assert torch.equal(target[labelled], label[labelled])
    assert (weight[labelled] == 1).all()


@given(batches(), st.sampled_from(["st", "ast"]))
def test_pixels_without_a_label_get_ignore_and_weight_zero(batch, mode):
    probs, label = batch
    target, weight = pseudo_labels(probs, label, unseen=UNSEEN, mode=mode)
    assert torch.equal(target == 255, weight == 0)
    eligible = (label == 255) & torch.isin(probs.argmax(1), torch.tensor(UNSEEN))
    assert (target[(label == 255) & ~eligible] == 255).all()
    assert torch.isin(target[(label == 255) & (target != 255)], torch.tensor(UNSEEN)).all()


@given(batches(), st.sampled_from(["st", "ast"]), st.integers(0, 2**31 - 1))
def test_padding_pixels_never_get_a_pseudo_label_or_a_weight_and_the_image_keeps_its_own(batch, mode, seed):
    probs, label = batch
    g = torch.Generator().manual_seed(seed)
    padding = torch.rand(label.shape, generator=g) < 0.4  # a crop's padding is labelled 255 too
    label = label.masked_fill(padding, 255)
    target, weight = pseudo_labels(probs, label, unseen=UNSEEN, mode=mode, keep=1.0,
                                   padding=padding)
    assert (target[padding] == 255).all() and (weight[padding] == 0).all()
    eligible = (label == 255) & ~padding & torch.isin(probs.argmax(1), torch.tensor(UNSEEN))
    assert torch.equal(target[eligible], probs.argmax(1)[eligible]) and (weight[eligible] > 0).all()


@given(batches(), st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_st_keeps_exactly_the_most_confident_fraction_per_unseen_class(batch, keep):
    probs, label = batch
    target, weight = pseudo_labels(probs, label, unseen=UNSEEN, mode="st", keep=keep)
    confidence, predicted = probs.max(1)
    for c in UNSEEN:
        candidates = (label == 255) & (predicted == c)
        n = int(candidates.sum())
        kept = candidates & (target == c)
        assert int(kept.sum()) == math.ceil(keep * n)
        if 0 < int(kept.sum()) < n:
            assert confidence[kept].min() >= confidence[candidates & ~kept].max()
        assert (weight[kept] == 1).all()


@given(batches(), st.sampled_from([0.5, 2.0, 8.0]))
def test_ast_keeps_every_eligible_pixel_with_eq17_weights_per_image(batch, T):
    probs, label = batch
    target, weight = pseudo_labels(probs, label, unseen=UNSEEN, mode="ast", T=T)
    confidence, predicted = probs.max(1)
    eligible = (label == 255) & torch.isin(predicted, torch.tensor(UNSEEN))
    assert torch.equal(target[eligible], predicted[eligible])
    for b in range(len(label)):
        if eligible[b].any():
            p = confidence[b][eligible[b]]
            torch.testing.assert_close(weight[b][eligible[b]], softmax_then_divide(p, T))


def test_ast_softmax_over_the_batch_gives_one_maximum_for_the_whole_batch():
    probs = torch.zeros(2, K, 1, 2, dtype=torch.float64)
    probs[0, 3] = torch.tensor([[0.9, 0.6]])
    probs[1, 4] = torch.tensor([[0.7, 0.6]])
    probs[:, 0] = 1 - probs[:, 3:].sum(1)
    label = torch.full((2, 1, 2), 255)
    _, per_image = pseudo_labels(probs, label, unseen=UNSEEN, mode="ast", T=1.0)
    _, per_batch = pseudo_labels(probs, label, unseen=UNSEEN, mode="ast", T=1.0, softmax_over="batch")
    assert per_image[0, 0, 0] == 1.0 and per_image[1, 0, 0] == 1.0
    assert per_batch[0, 0, 0] == 1.0
    torch.testing.assert_close(per_batch[1, 0, 0], torch.tensor(math.exp(0.7 - 0.9), dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="soft"), "mode must be"),
    (dict(mode="st", keep=0.0), "keep must be"),
    (dict(mode="ast", softmax_over="pixel"), "softmax_over"),
    (dict(mode="ast", unseen=[7]), "must lie in"),
    (dict(mode="ast", padding=torch.zeros(1, 2, 2)), "padding must be a bool mask"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    kwargs = {"unseen": UNSEEN, **kwargs}
    with pytest.raises(ValueError, match=match):
        pseudo_labels(torch.rand(1, K, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), **kwargs)


def test_mismatched_shapes_raise_value_error():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        pseudo_labels(torch.rand(1, K, 2, 2), torch.zeros(1, 3, 2, dtype=torch.long), unseen=UNSEEN, mode="st")
