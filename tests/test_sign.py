"""The executable specification of sign.py: the networks of Fig. 2 and Eq. (1) (marker
``sim``) and the losses of Eqs. (2)-(4) and (7)-(10) (marker ``losses``).

Every model here is tiny (small encoder, 16-d features) so the file runs in seconds on CPU;
the ResNet tests build random-init ResNet-18/50 and never load weights.
"""
import json
import math
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import sign
from mmd import classwise_mmd
from sign import (ASPP, SIGN, SIM, DeepLabV2, SemanticMapping, SmallEncoder, discriminator_loss,
                  generator_loss, kl_loss, prediction_loss, resize_labels, sim_step_loss,
                  transfer_loss)

K, NUM_SEEN, E_DIM = 6, 4, 12
TINY = dict(num_seen=NUM_SEEN, encoder="small", feat_dim=16, pe_dim=8, latent_dim=16, heads=2,
            hidden=16, small_width=8, train_size=(32, 32))


def tiny_model(**overrides) -> SIGN:
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(K, E_DIM), dim=1)
    return SIGN(embeddings, **{**TINY, **overrides})


def labels_like(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A seen-class label map at feature resolution with a band of ignored (255) pixels."""
    B, _, h, w = features.shape
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_SEEN, (B, h, w), generator=g)
    y[:, 0] = 255
    return y


def grad_owners(loss: torch.Tensor, model: SIGN) -> set[str]:
    """The networks among E, SIM, C, G, D whose parameters receive a non-zero gradient."""
    nets = {n: getattr(model, n) for n in ("E", "SIM", "C", "G", "D") if getattr(model, n) is not None}
    named = [(n, p) for n, net in nets.items() for p in net.parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n for (n, _), g in zip(named, grads) if g is not None and g.abs().sum() > 0}


# ----------------------------------------------------------------------------- networks (sim)
@pytest.mark.sim
@pytest.mark.parametrize("pe", sign.PE_KINDS)
@pytest.mark.parametrize("arch", sign.SIM_ARCHS)
@pytest.mark.parametrize("latent_path, L", [("gate", 16), ("side", 8)])  # the side path allows L != F
def test_every_sim_architecture_and_pe_gives_the_documented_shapes_at_two_sizes(arch, pe, latent_path, L):
    model = tiny_model(sim=arch, pe=pe, latent_path=latent_path, latent_dim=L)
    for H, W in [(32, 32), (40, 56)]:
        x = torch.randn(2, 3, H, W)
        h, w = model.feature_size(H, W)
        F_x, z, mu, logvar = model.features(x)
        assert F_x.shape == (2, 16, h, w)
        assert z.shape == mu.shape == logvar.shape == (2, L, h, w)
        assert model(x).shape == (2, K, H, W)
        assert model.generate(labels_like(F_x), z).shape == F_x.shape


@pytest.mark.sim
@pytest.mark.parametrize("arch", sign.SIM_ARCHS)
def test_every_sim_block_is_residual_so_zero_weights_make_it_the_identity(arch):
    block = SIM(16, arch=arch, pe="none", latent_dim=16, heads=2).block
    for p in block.parameters():
        nn.init.zeros_(p)
    h = torch.randn(2, 16, 5, 6)
    assert torch.allclose(block(h), h)


@pytest.mark.sim
@pytest.mark.parametrize("arch", ["self-attention", "multihead"])
def test_transformer_blocks_start_as_the_identity_and_leave_it_after_one_step(arch):
    torch.manual_seed(0)
    block = SIM(16, arch=arch, pe="none", latent_dim=16, heads=2).block
    h = torch.randn(2, 16, 5, 6)
    assert torch.equal(block(h), h)  # both residual branches are zero at construction
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    block(h).pow(2).sum().neg().backward()  # any loss: the zero layers still receive gradient
    opt.step()
    assert not torch.allclose(block(h), h)


@pytest.mark.sim
@pytest.mark.parametrize("latent_path", sign.LATENT_PATHS)
def test_f_x_is_h_gated_by_sigmoid_z_or_h_itself_on_the_side_path(latent_path):
    sim = SIM(16, arch="conv", pe="rpe", pe_dim=8, latent_dim=16, latent_path=latent_path)
    f = torch.randn(2, 16, 5, 6)
    for mode in ("train", "eval"):
        getattr(sim, mode)()
        torch.manual_seed(1)
        F_x, z, mu, logvar = sim(f)
        h = sim.block(sim.fuse(torch.cat([f, sim.positional_encoding(5, 6).expand(2, -1, -1, -1)], 1)))
        torch.testing.assert_close(F_x, h + h * torch.sigmoid(z) if latent_path == "gate" else h)
        assert torch.equal(z, mu) == (mode == "eval")  # z = mu + sigma * eps in training, mu in eval


def scrambled(model: SIGN) -> SIGN:
    """The model with every SIM weight random: the zero-initialised Transformer branches would
    otherwise block the gradient at step 0 and hide which parameters a loss can reach at all."""
    torch.manual_seed(2)
    for p in model.SIM.parameters():
        nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.sim
@pytest.mark.parametrize("arch", sign.SIM_ARCHS)
def test_through_the_gate_eq3_alone_trains_every_parameter_of_sim(arch):
    model = scrambled(tiny_model(sim=arch)).train()
    F_x, z, mu, logvar = model.features(torch.randn(2, 3, 32, 32))
    loss, _ = sim_step_loss(model.C(F_x), labels_like(F_x), mu, logvar, num_seen=NUM_SEEN, alpha=0.0)  # Eq. (3)
    grads = torch.autograd.grad(loss, list(model.SIM.parameters()))
    silent = [n for (n, _), g in zip(model.SIM.named_parameters(), grads) if not g.abs().sum() > 0]
    assert silent == []


@pytest.mark.sim
def test_on_the_side_path_eq3_never_reaches_z_so_only_the_kl_term_trains_its_heads():
    model = scrambled(tiny_model(latent_path="side")).train()
    F_x, z, mu, logvar = model.features(torch.randn(2, 3, 32, 32))
    loss, _ = sim_step_loss(model.C(F_x), labels_like(F_x), mu, logvar, num_seen=NUM_SEEN, alpha=0.0)
    heads = list(model.SIM.reparameterize.parameters())
    assert all(g is None or not g.any() for g in torch.autograd.grad(loss, heads, allow_unused=True))


@pytest.mark.sim
def test_the_gate_needs_z_as_wide_as_the_features():
    with pytest.raises(ValueError, match="latent_dim must equal feat_dim"):
        SIM(16, latent_dim=8, pe="none")
    assert SIM(16, latent_dim=8, pe="none", latent_path="side")(torch.randn(1, 16, 3, 3))[1].shape[1] == 8


@pytest.mark.sim
def test_without_sim_features_are_the_encoder_output_and_g_draws_pure_noise():
    model = tiny_model(sim="none")
    x = torch.randn(2, 3, 32, 32)
    F_x, z, mu, logvar = model.features(x)
    assert z is None and mu is None and logvar is None
    assert torch.equal(F_x, model.E(x))
    y = labels_like(F_x)
    torch.manual_seed(1)
    a = model.generate(y)
    assert a.shape == F_x.shape and not torch.equal(a, model.generate(y))


@pytest.mark.sim
def test_g_computes_its_definition_g_of_m_y_concatenated_with_z_and_its_gradients():
    model = scrambled(tiny_model()).double()
    y = torch.tensor([[[0, 3, 255], [NUM_SEEN, 1, 1]]])  # (1, 2, 3): seen, unseen and ignore pixels
    z = torch.randn(1, model.latent_dim, 2, 3, dtype=torch.float64)
    fake = model.generate(y, z)  # G.from_table: M(y) is never built
    reference = model.G(torch.cat([model.M(y), z], 1))  # the definition, F^_x = G(e (+) z)
    torch.testing.assert_close(fake, reference)
    params = list(model.G.parameters())
    torch.testing.assert_close(torch.autograd.grad(fake.square().sum(), params),
                               torch.autograd.grad(reference.square().sum(), params))


@pytest.mark.sim
@pytest.mark.parametrize("encoder,stride", [("resnet18", 8), ("resnet50", 8), ("small", 4)])
def test_encoder_output_is_one_over_output_stride_of_the_input(encoder, stride):
    model = tiny_model(encoder=encoder, sim="none")
    for H, W in [(33, 47), (40, 24)]:
        f = model.E(torch.randn(1, 3, H, W))
        assert f.shape[-2:] == (math.ceil(H / stride), math.ceil(W / stride)) == model.feature_size(H, W)


@pytest.mark.sim
def test_small_encoder_supports_output_stride_8():
    model = tiny_model(output_stride=8)
    assert model.E(torch.randn(1, 3, 33, 47)).shape[-2:] == (5, 6) == model.feature_size(33, 47)


@pytest.mark.sim
@pytest.mark.parametrize("context, stride, field", [("wide", 4, 63), ("local", 4, 15), ("wide", 8, 127)])
def test_small_encoder_receptive_field(context, stride, field):
    """The pixels one feature's convolutions reach: each conv adds (k - 1) * dilation input steps."""
    reach, step = 1, 1
    for conv in (m for m in SmallEncoder(8, width=8, output_stride=stride, context=context).modules()
                 if isinstance(m, nn.Conv2d)):
        reach += (conv.kernel_size[0] - 1) * conv.dilation[0] * step
        step *= conv.stride[0]
    assert (reach, step) == (field, stride)


@pytest.mark.sim
def test_resnet18_is_dilated_by_hand_like_torchvision_dilates_bottlenecks():
    body = DeepLabV2(8, depth=18).body
    layer3, layer4 = body[6], body[7]
    assert [b.conv2.dilation for b in layer3] == [(1, 1), (2, 2)]
    assert [b.conv2.dilation for b in layer4] == [(2, 2), (4, 4)]
    assert all(c.stride == (1, 1) for b in list(layer3) + list(layer4) for c in (b.conv1, b.conv2))


@pytest.mark.sim
def test_batchnorm_stays_frozen_after_a_training_step():
    torch.manual_seed(0)
    E = DeepLabV2(8, depth=18)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in E.modules())
    frozen = [m for m in E.modules() if isinstance(m, sign.FrozenBatchNorm2d)]
    before = [b.clone() for m in frozen for b in m.buffers()]
    x = torch.randn(2, 3, 33, 33)
    E.train()
    optimizer = torch.optim.SGD(E.parameters(), lr=0.1)
    E(x).pow(2).mean().backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (b for m in frozen for b in m.buffers())))
    with torch.no_grad():  # train mode does not use batch statistics
        assert torch.allclose(E.train()(x), E.eval()(x))


@pytest.mark.sim
def test_aspp_sums_four_branches_at_dilations_6_12_18_24():
    aspp = ASPP(8, 5)
    assert [b.dilation for b in aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.randn(2, 8, 9, 11)
    assert torch.allclose(aspp(x), sum(b(x) for b in aspp.branches), atol=1e-6)


@pytest.mark.sim
def test_pretrained_without_internet_names_the_file_and_torchvision_cache(monkeypatch, tmp_path):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match=str(tmp_path / "checkpoints" / "resnet18-")):
        DeepLabV2(8, depth=18, pretrained=True)


@pytest.mark.sim
def test_pretrained_false_never_downloads_and_other_load_errors_pass_through(monkeypatch):
    def broken(url, *args, **kwargs):
        raise RuntimeError("invalid hash value")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", broken)
    DeepLabV2(8, depth=18)  # pretrained=False: the loader is never called
    with pytest.raises(RuntimeError, match="^invalid hash value$"):  # not reworded as "offline"
        DeepLabV2(8, depth=18, pretrained=True)


@pytest.mark.sim
def test_eval_is_deterministic_with_z_equal_to_mu_and_accepts_any_size():
    model = tiny_model().eval()
    for H, W in [(32, 32), (45, 61), (17, 80)]:
        x = torch.randn(1, 3, H, W)
        assert torch.equal(model(x), model(x)) and model(x).shape == (1, K, H, W)
        _, z, mu, _ = model.features(x)
        assert torch.equal(z, mu)
    _, z, mu, _ = model.train().features(torch.randn(1, 3, 32, 32))
    assert not torch.equal(z, mu)


@pytest.mark.sim
@pytest.mark.parametrize("arch", ["self-attention", "multihead"])
def test_positional_encoding_is_what_makes_a_constant_feature_map_vary_in_space(arch):
    torch.manual_seed(0)
    constant = torch.ones(1, 16, 5, 7)
    # eval: z = mu, so the gate adds no noise that would vary in space by itself
    without = SIM(16, arch=arch, pe="none", pe_dim=8, latent_dim=16, heads=2).eval()(constant)[0]
    with_rpe = SIM(16, arch=arch, pe="rpe", pe_dim=8, latent_dim=16, heads=2).eval()(constant)[0]
    assert torch.allclose(without, without[..., :1, :1].expand_as(without), atol=1e-5)
    assert not torch.allclose(with_rpe, with_rpe[..., :1, :1].expand_as(with_rpe), atol=1e-3)


@pytest.mark.sim
def test_ape_interp_is_ape_at_the_training_feature_size():
    model = tiny_model(pe="ape-interp", train_size=(40, 24))
    assert model.SIM.pe_train_size == (10, 6) == model.E(torch.randn(1, 3, 40, 24)).shape[-2:]
    model_ape = tiny_model(pe="ape")
    assert torch.allclose(model.SIM.positional_encoding(10, 6), model_ape.SIM.positional_encoding(10, 6))
    with pytest.raises(ValueError, match="ape-interp"):
        tiny_model(pe="ape-interp", train_size=None)


@pytest.mark.sim
def test_semantic_mapping_looks_up_rows_and_maps_255_to_zero():
    table = torch.randn(K, E_DIM)
    M = SemanticMapping(table)
    assert list(M.parameters()) == [] and "table" in M.state_dict()
    y = torch.tensor([[[0, 3], [255, 5]]])  # (1, 2, 2)
    e = M(y)  # (1, E_DIM, 2, 2)
    assert torch.equal(e[0, :, 0, 0], table[0]) and torch.equal(e[0, :, 1, 1], table[5])
    assert torch.equal(e[0, :, 1, 0], torch.zeros(E_DIM))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        M(torch.tensor([[[K]]]))


@pytest.mark.sim
def test_labels_are_resized_nearest_by_sampling_every_stride_th_pixel():
    y = torch.arange(64).reshape(1, 8, 8)
    assert torch.equal(resize_labels(y, (2, 2)), torch.tensor([[[0, 4], [32, 36]]]))
    M = SemanticMapping(torch.randn(64, 3))
    assert torch.equal(M(y, size=(2, 2)), M(resize_labels(y, (2, 2))))


@pytest.mark.sim
def test_config_is_json_and_rebuilds_an_identical_model_from_a_state_dict():
    model = tiny_model(sim="attention", pe="ape-interp").eval()
    config = json.loads(json.dumps(model.config))
    rebuilt = SIGN.from_config(config)  # M's table is filled by the state_dict
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 36, 44)
    assert torch.equal(rebuilt.eval()(x), model(x))
    assert torch.equal(rebuilt.M.table, model.M.table)
    assert rebuilt.config == config  # the round trip is exact
    with pytest.raises(ValueError, match=r"\(6, 12\)"):
        SIGN.from_config(config, torch.zeros(3, 12))
    # a key missing would let a constructor default stand in for the saved value
    with pytest.raises(ValueError, match=r"lacks \['latent_path'\]"):
        SIGN.from_config({k: v for k, v in config.items() if k != "latent_path"})


@pytest.mark.sim
def test_param_count_command_prints_the_four_sim_sizes(capsys):
    sign.main(["--param-count", "--feat-dim", "32", "--pe-dim", "16", "--heads", "4"])
    out = capsys.readouterr().out
    for arch, paper in sign.TABLE2.items():
        n = sum(p.numel() for p in SIM(32, arch=arch, pe_dim=16, latent_dim=32, heads=4).parameters())
        assert f"{n / 1e6:.2f}M" in out and paper in out


# ----------------------------------------------------------------------------- Eq. (2)
@pytest.mark.losses
def test_kl_is_zero_for_a_standard_normal():
    assert kl_loss(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)) == 0


@pytest.mark.losses
@given(st.floats(-3, 3), st.floats(-3, 3))
def test_kl_is_positive_away_from_a_standard_normal(mu, logvar):
    assume(abs(mu) > 1e-3 or abs(logvar) > 1e-3)
    assert kl_loss(torch.tensor(mu, dtype=torch.float64).view(1, 1, 1, 1),
                   torch.tensor(logvar, dtype=torch.float64).view(1, 1, 1, 1)) > 0


@pytest.mark.losses
def test_kl_equals_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    logvar = torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(200_000, *mu.shape, generator=g, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * eps
    # log q(z) - log p(z) for q = N(mu, sigma^2), p = N(0, 1); the 2 pi terms cancel
    log_ratio = -0.5 * logvar - 0.5 * eps ** 2 + 0.5 * z ** 2
    assert kl_loss(mu, logvar).item() == pytest.approx(log_ratio.mean().item(), abs=5e-3)


@pytest.mark.losses
def test_kl_gradients_reach_mu_and_logvar():
    mu = torch.full((1, 2, 3, 3), 0.5, requires_grad=True)
    logvar = torch.full((1, 2, 3, 3), 0.5, requires_grad=True)
    kl_loss(mu, logvar).backward()
    assert mu.grad.abs().min() > 0 and logvar.grad.abs().min() > 0


@pytest.mark.losses
def test_kl_mask_averages_over_selected_pixels_only():
    mu, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 4, 4) > 0.5
    per_pixel = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp())).mean(1)  # (B, h, w)
    assert torch.allclose(kl_loss(mu, logvar, mask), per_pixel[mask].mean())
    assert kl_loss(mu, logvar, torch.zeros(2, 4, 4, dtype=torch.bool)) == 0


# ----------------------------------------------------------------------------- Eqs. (3), (9)
def _logits_and_target(seed: int, B=2, C=5, h=3, w=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (B, h, w), generator=g)
    target[torch.rand(B, h, w, generator=g) < 0.3] = 255
    target[0, 0, 0] = 1  # at least one labelled pixel
    return logits, target


@pytest.mark.losses
@given(st.integers(0, 10_000))
def test_ce_equals_torch_cross_entropy_with_ignore_255(seed):
    logits, target = _logits_and_target(seed)
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(prediction_loss(logits, target), expected)
    ones = torch.ones(target.shape, dtype=torch.float64)
    assert torch.allclose(prediction_loss(logits, target, ones), expected)


@pytest.mark.losses
@given(st.integers(0, 10_000))
def test_weighted_ce_matches_a_loop_over_pixels(seed):
    logits, target = _logits_and_target(seed)
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    num = den = 0.0
    B, C, h, w = logits.shape
    for b in range(B):
        for i in range(h):
            for j in range(w):
                t = target[b, i, j].item()
                if t != 255:
                    p = math.exp(logits[b, t, i, j]) / sum(math.exp(logits[b, c, i, j]) for c in range(C))
                    num += weight[b, i, j].item() * -math.log(p)
                    den += weight[b, i, j].item()
    assert prediction_loss(logits, target, weight).item() == pytest.approx(num / den, rel=1e-9)


@pytest.mark.losses
def test_zero_weights_remove_pixels_as_if_they_were_ignored():
    logits, target = _logits_and_target(3)
    weight = torch.ones(target.shape, dtype=torch.float64)
    weight[1] = 0
    removed = target.clone()
    removed[1] = 255
    expected = F.cross_entropy(logits, removed, ignore_index=255)
    assert torch.allclose(prediction_loss(logits, target, weight), expected)


@pytest.mark.losses
def test_ce_without_any_labelled_pixel_is_zero_and_backpropagates():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = prediction_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------- Eqs. (4), (7), (8), (10)
@pytest.mark.losses
def test_sim_step_loss_is_pred_over_seen_classes_plus_alpha_kld():
    logits, target = _logits_and_target(5, C=6)
    target[(target >= NUM_SEEN) & (target != 255)] = 0
    mu, logvar = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    total, parts = sim_step_loss(logits, target, mu, logvar, num_seen=NUM_SEEN, alpha=7.0)
    seen_ce = F.cross_entropy(logits[:, :NUM_SEEN], target, ignore_index=255)
    assert torch.allclose(parts["pred"], seen_ce) and torch.allclose(parts["kld"], kl_loss(mu, logvar))
    assert torch.allclose(total, seen_ce + 7.0 * kl_loss(mu, logvar).double())
    with pytest.raises(ValueError, match="num_seen"):
        sim_step_loss(logits, torch.full_like(target, 5), mu, logvar, num_seen=NUM_SEEN)


@pytest.mark.losses
def test_discriminator_loss_is_eq7_over_labelled_pixels():
    model = tiny_model()
    real, fake = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    y = labels_like(real)
    mask = y != 255
    d_real, d_fake = model.D(real)[:, 0][mask], model.D(fake)[:, 0][mask]
    expected = -(F.logsigmoid(d_real).mean() + torch.log1p(-torch.sigmoid(d_fake)).mean())
    assert torch.allclose(discriminator_loss(model.D, real, fake, y), expected, atol=1e-5)
    other_real = real.clone()
    other_real[:, :, 0] += 5.0  # row 0 is ignored (255)
    loss = discriminator_loss(model.D, real, fake, y)
    assert torch.equal(discriminator_loss(model.D, other_real, fake, y), loss)


@pytest.mark.losses
def test_generator_loss_is_non_saturating_adv_plus_beta_mmd():
    model = tiny_model()
    real, fake = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    y = labels_like(real)
    total, parts = generator_loss(model.D, real, fake, y, model.seen_classes, beta=3.0, max_per_class=10_000)
    adv = -F.logsigmoid(model.D(fake)[:, 0][y != 255]).mean()
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 16)  # noqa: E731
    mmd = classwise_mmd(flat(real), flat(fake), y.reshape(-1), model.seen_classes, max_per_class=10_000)
    assert torch.allclose(parts["adv"], adv) and torch.allclose(parts["mmd"], mmd)
    assert torch.allclose(total, adv + 3.0 * mmd)


@pytest.mark.losses
def test_transfer_loss_is_ce_on_real_plus_ce_on_synthetic_over_all_classes():
    model = tiny_model()
    real, fake = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    y, y_hat = labels_like(real, 0), torch.randint(0, K, (2, 4, 4))
    total, parts = transfer_loss(model.C, real, y, fake, y_hat)
    expected = (F.cross_entropy(model.C(real), y, ignore_index=255)
                + F.cross_entropy(model.C(fake), y_hat, ignore_index=255))
    assert torch.allclose(total, expected)


@pytest.mark.losses
@pytest.mark.parametrize("sim", ["multihead", "none"])
def test_each_step_loss_trains_exactly_the_networks_of_its_step(sim):
    model = tiny_model(sim=sim).train()
    F_x, z, mu, logvar = model.features(torch.randn(2, 3, 32, 32))
    y = labels_like(F_x)
    y_hat = torch.randint(0, K, y.shape)
    with_sim = {"SIM"} if sim != "none" else set()
    eq4, _ = sim_step_loss(model.C(F_x), y, mu, logvar, num_seen=NUM_SEEN)
    assert grad_owners(eq4, model) == {"E", "C"} | with_sim
    fake = model.generate(y, z)
    assert grad_owners(generator_loss(model.D, F_x, fake, y, model.seen_classes)[0], model) == {"G"}
    assert grad_owners(discriminator_loss(model.D, F_x, fake, y), model) == {"D"}
    assert grad_owners(transfer_loss(model.C, F_x, y, model.generate(y_hat), y_hat)[0], model) == {"C"}


@pytest.mark.losses
def test_generator_loss_keeps_the_mmd_in_float32_under_autocast():
    """Mixed precision (--amp) must not compute Eq. (6)'s distances in half precision."""
    model = tiny_model()
    real, fake = 30 + torch.randn(2, 16, 4, 4), 30 + torch.randn(2, 16, 4, 4)  # large norms, small gaps
    y = labels_like(real)
    reference = generator_loss(model.D, real, fake, y, model.seen_classes, max_per_class=10_000)[1]["mmd"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = generator_loss(model.D, real, fake, y, model.seen_classes, max_per_class=10_000)[1]["mmd"]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-4, atol=1e-5)
