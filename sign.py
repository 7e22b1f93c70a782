"""SIGN's six networks (E, SIM, G, D, C, M), one ``nn.Module`` per box of Fig. 2, and the losses of Eqs. (1)-(4) and
(7)-(10) as plain functions. Changes versus the paper: README, "Deviations from the paper".

Reading order (Fig. 2, left to right: image -> E -> SIM -> C, with M -> G -> D beside it)
    ASPP, DeepLabV2, SmallEncoder   E, the feature encoder (DeepLab-v2 or a small CPU CNN)
    _Block, SIM                     Eq. (1): F_x, z = SIM(E(x) (+) PE); supp. Figs. 6-8
    resize_labels, SemanticMapping  M: e = M(y), labels resized to the feature map
    Generator                       G: F^_x = G(e (+) z), ``from_table`` without building e
    SIGN                            all six (C, D: per-pixel convs); ``first_classes``, ``with_classes``
    kl_loss, prediction_loss        Eq. (2); Eqs. (3) and (9), optionally weighted per pixel
    sim_step_loss                   Eq. (4), Training Step (SIM): E, SIM, C
    discriminator_loss              Eq. (7), D's side
    generator_loss                  Eq. (8), Training Step (G): L_adv + beta L_MMD (Eq. 5)
    transfer_loss                   Eq. (10), Transfer Learning Step: C only
    main                            ``python sign.py --param-count``: SIM sizes beside Table 2

Symbol -> identifier (B batch, K classes, F feat_dim, P pe_dim, L latent_dim, h x w feature map)
    E(x)               model.E(x)                     (B, F, h, w), h = ceil(H / output_stride)
    PE                 model.SIM.positional_encoding  (P, h, w), from rpe.py
    F_x, z, mu, log sigma^2  model.SIM(E(x)) -> F_x, z, mu, logvar  (B, F, h, w), (B, L, h, w)
    h                  SIM's encoded features, F_x = h + h * sigmoid(z)  (B, F, h, w)
    e = M(y)           model.M(y, size)               (B, e_dim, h, w); label 255 -> 0
    F^_x = G(e (+) z)  model.generate(y, z)           (B, F, h, w)
    D(f), p = C(F_x)   model.D(f), model.C(F_x)       logits (B, 1, h, w), (B, K, h, w)
    alpha, beta        alpha = 100, beta = 50 (paper section 4.2)
    C^S, C^U           classes [0, num_seen) and [num_seen, K): seen first, then unseen
"""
import argparse
import inspect
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d

from mmd import DEFAULT_SIGMAS, classwise_mmd
from rpe import absolute_positional_encoding, interpolated_absolute_positional_encoding, relative_positional_encoding

IGNORE = 255
SIM_ARCHS = ("conv", "attention", "self-attention", "multihead")
PE_KINDS = ("none", "ape", "ape-interp", "rpe")
LATENT_PATHS = ("gate", "side")
ENCODERS = {"resnet101": 101, "resnet50": 50, "resnet18": 18, "small": None}


# ----------------------------------------------------------------------------- E
class ASPP(nn.Module):
    """DeepLab-v2's atrous spatial pyramid: parallel 3x3 convs at several dilations, SUMMED."""
    def __init__(self, in_channels: int, out_channels: int, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.branches:  # DeepLab-v2's initialisation of its last layer
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sum(branch(x) for branch in self.branches)  # (B, out, h, w)


class DeepLabV2(nn.Sequential):
    """E: dilated ResNet (output stride 8, frozen BN), then ASPP summed into ``out_channels``:
    (B, 3, H, W) -> (B, out, H/8, W/8)."""
    output_stride = 8

    def __init__(self, out_channels: int = 600, *, depth: int = 101, pretrained: bool = False):
        name = f"resnet{depth}"
        dilate = dict(replace_stride_with_dilation=[False, True, True]) if depth >= 50 else {}
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1 if pretrained else None
        try:  # weights=None: random init only; else the same random init, then the ImageNet state dict
            net = getattr(torchvision.models, name)(weights=weights, norm_layer=FrozenBatchNorm2d, **dilate)
        except OSError as err:  # a failed download (urllib's URLError is an OSError)
            path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise RuntimeError(f"DeepLabV2: could not download ImageNet weights for {name} ({err}). "
                               f"Without internet, copy {weights.url} to {path}") from err
        if depth < 50:  # torchvision won't dilate BasicBlock: do it by torchvision's rule for Bottleneck
            for layer, previous, dilation in ((net.layer3, 1, 2), (net.layer4, 2, 4)):
                layer[0].downsample[0].stride = (1, 1)  # the stage's 1x1 shortcut conv
                for i, block in enumerate(layer):
                    d = previous if i == 0 else dilation
                    for conv in (block.conv1, block.conv2):
                        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        super().__init__(OrderedDict(body=nn.Sequential(*list(net.children())[:-2]),  # all but avgpool and fc
                                     aspp=ASPP(net.fc.in_features, out_channels)))


class SmallEncoder(nn.Sequential):
    """E for the CPU benchmark, (B, 3, H, W) -> (B, out, H/os, W/os): strided convs to 1/os, three
    3x3 convs, a linear 1x1 head. ``context`` "wide": the three at dilations 1, 2, 4 (receptive field
    63 px at os = 4); "local": one 3x3 and two 1x1 (15 px), a feature that cannot see the whole scene.
    GroupNorm, not BatchNorm: freezing E later (transfer, self-training) leaves no running statistics to drift."""
    def __init__(self, out_channels: int = 64, *, width: int = 64, output_stride: int = 4, context: str = "wide"):
        if output_stride not in (4, 8) or context not in ("wide", "local"):
            raise ValueError(f"SmallEncoder: output_stride must be 4 or 8 and context 'wide' or 'local', "
                             f"got {output_stride}, {context!r}")
        block = partial(Conv2dNormActivation, norm_layer=lambda c: nn.GroupNorm(min(8, c), c), bias=True)
        kernels, dilations = ((3, 3, 3), (1, 2, 4)) if context == "wide" else ((3, 1, 1), (1, 1, 1))
        super().__init__(block(3, width // 2, stride=2), block(width // 2, width, stride=2),
                         *([block(width, width, stride=2)] if output_stride == 8 else []),
                         *(block(width, width, k, dilation=d) for k, d in zip(kernels, dilations)),
                         nn.Conv2d(width, out_channels, 1))
        self.output_stride = output_stride


# ----------------------------------------------------------------------------- SIM
class _Block(nn.Module):
    """SIM's residual block h + f(h), one of Table 2's four: (A) conv, f = conv1x1(relu(conv3x3(h)));
    (B) attention, CaGNet-style: sigmoid maps at dilations 1/2/4 scale a context conv, the three results
    concatenated and fused by a 1x1 conv; (C) self-attention, (D) multihead: a pre-norm Transformer
    encoder layer over the h*w pixels, attention then a 2F MLP."""
    def __init__(self, dim: int, arch: str, heads: int):
        super().__init__()
        self.arch = arch
        if arch == "conv":
            self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))
        elif arch == "attention":
            self.context = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU())
            self.maps = nn.ModuleList(nn.Conv2d(dim, 1, 3, padding=d, dilation=d) for d in (1, 2, 4))
            self.fuse = nn.Conv2d(3 * dim, dim, 1)
        else:
            qk = max(dim // 8, 1)
            self.norm1 = nn.LayerNorm(dim)
            if arch == "multihead":  # per-head projections, concatenated, projected back
                self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
            else:  # supp. Fig. 7: one head, queries and keys reduced to F/8, values full width
                self.attention = nn.ModuleDict(dict(q=nn.Linear(dim, qk), k=nn.Linear(dim, qk),
                                                    v=nn.Linear(dim, dim), out=nn.Linear(dim, dim)))
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
            # Both residual branches start at zero: the block starts as the identity (why: README).
            out = self.attention.out_proj if arch == "multihead" else self.attention["out"]
            for p in (out.weight, out.bias, self.mlp[-1].weight, self.mlp[-1].bias):
                nn.init.zeros_(p)

    def forward(self, h: Tensor) -> Tensor:  # (B, F, h, w)
        if self.arch == "conv":
            return h + self.body(h)
        if self.arch == "attention":
            c = self.context(h)  # (B, F, h, w)
            return h + self.fuse(torch.cat([c * torch.sigmoid(m(c)) for m in self.maps], 1))
        t = h.flatten(2).transpose(1, 2)  # (B, H*W, F)
        n, a = self.norm1(t), self.attention
        if self.arch == "multihead":
            t = t + a(n, n, n, need_weights=False)[0]
        else:
            t = t + a.out(F.scaled_dot_product_attention(a.q(n), a.k(n), a.v(n)))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(h.shape).contiguous()  # (B, F, h, w)


class SIM(nn.Module):
    """Spatial Information Module, Eq. (1): F_x, z = SIM(E(x) (+) PE). A 1x1 conv fuses E(x) (+) PE to
    F channels, a ``_Block`` gives h, 1x1 heads mu and log sigma^2 (supp. Fig. 6); ``latent_path`` is how
    z reaches F_x (README, deviations). PE is recomputed per call for the current h x w: any size works."""
    def __init__(self, dim: int, *, arch: str = "multihead", pe: str = "rpe", pe_dim: int = 600,
                 latent_dim: int = 600, heads: int = 8, pe_train_size: tuple[int, int] | None = None,
                 rpe_c: float = 512.0, rpe_endpoint: bool = False, latent_path: str = "gate"):
        super().__init__()
        if arch not in SIM_ARCHS or pe not in PE_KINDS or latent_path not in LATENT_PATHS:
            raise ValueError(f"SIM: arch must be one of {SIM_ARCHS}, pe one of {PE_KINDS} and latent_path "
                             f"one of {LATENT_PATHS}, got {arch!r}, {pe!r}, {latent_path!r}")
        if latent_path == "gate" and latent_dim != dim:
            raise ValueError(f"SIM: for the gate, latent_dim must equal feat_dim {dim}, got {latent_dim}")
        if pe == "ape-interp" and pe_train_size is None:
            raise ValueError("SIM: pe='ape-interp' needs the training feature size pe_train_size")
        if arch == "multihead" and dim % heads:
            raise ValueError(f"SIM: feat_dim {dim} is not divisible by heads={heads}")
        self.pe, self.pe_dim, self.pe_train_size, self.latent_path = pe, pe_dim, pe_train_size, latent_path
        self.rpe_c, self.rpe_endpoint = rpe_c, rpe_endpoint
        self.fuse = nn.Conv2d(dim + (pe_dim if pe != "none" else 0), dim, 1)
        self.block = _Block(dim, arch, heads)
        self.reparameterize = nn.ModuleDict(dict(mu=nn.Conv2d(dim, latent_dim, 1),
                                                 logvar=nn.Conv2d(dim, latent_dim, 1)))

    def positional_encoding(self, h: int, w: int, *, device=None, dtype=None) -> Tensor:
        """PE for an h x w feature map, (P, h, w), from rpe.py."""
        kw = dict(dim=self.pe_dim, device=device, dtype=dtype)
        if self.pe == "rpe":
            return relative_positional_encoding(h, w, c=self.rpe_c, endpoint=self.rpe_endpoint, **kw)
        if self.pe == "ape":
            return absolute_positional_encoding(h, w, **kw)
        if self.pe == "ape-interp":
            return interpolated_absolute_positional_encoding(h, w, train_size=self.pe_train_size, **kw)
        raise ValueError("SIM.positional_encoding: this SIM was built with pe='none'")

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # f = E(x), (B, F, h, w)
        if self.pe != "none":
            pe = self.positional_encoding(*f.shape[-2:], device=f.device, dtype=f.dtype)  # (P, h, w)
            f = torch.cat([f, pe.expand(len(f), -1, -1, -1)], 1)  # E(x) (+) PE, (B, F + P, h, w)
        h = self.block(self.fuse(f))  # encoded features, (B, F, h, w)
        mu, logvar = self.reparameterize.mu(h), self.reparameterize.logvar(h)  # (B, L, h, w) each
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu  # Eq. (1)
        F_x = h + h * torch.sigmoid(z) if self.latent_path == "gate" else h  # Eq. (1), (B, F, h, w)
        return F_x, z, mu, logvar


# ----------------------------------------------------------------------------- M, G (C and D: in SIGN)
def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a label map (B, H, W) -> (B, h, w). 'nearest' samples pixel
    (s*i, s*j) at stride s: the centre of feature (i, j)'s receptive field in a padded CNN."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


class SemanticMapping(nn.Module):
    """M: a frozen table of class embeddings (a buffer, not learnable); label 255 -> zeros."""
    def __init__(self, embeddings: Tensor):
        super().__init__()
        self.num_classes = len(embeddings)  # K
        self.register_buffer("table", F.pad(embeddings, (0, 0, 0, 1)).float())  # (K + 1, e_dim): zeros for 255

    def rows(self, labels: Tensor) -> Tensor:
        """The table row of every pixel, (B, h, w): its class, or the zero row for 255."""
        if ((labels < 0) | ((labels >= self.num_classes) & (labels != IGNORE))).any():
            raise ValueError(f"SemanticMapping: labels must lie in [0, {self.num_classes}) or be "
                             f"{IGNORE}, got values {labels.unique().tolist()}")
        return torch.where(labels == IGNORE, self.num_classes, labels)  # 255 -> the zero row

    def forward(self, labels: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        labels = resize_labels(labels, size) if size is not None else labels  # (B, h, w)
        return self.table[self.rows(labels)].permute(0, 3, 1, 2)  # e = M(y), (B, e_dim, h, w)


class Generator(nn.Sequential):
    """G: per pixel (1x1 convs), e (+) z -> a synthetic feature with F_x's channels. The output layer
    is linear: F_x ends in a sum with no activation (SIM's residual or ASPP's), unbounded of either
    sign. ``G(e (+) z)`` is the definition; ``G.from_table`` computes the same map for e = M(y)."""
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256):
        super().__init__(nn.Conv2d(in_dim, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, out_dim, 1))

    def from_table(self, table: Tensor, rows: Tensor, z: Tensor) -> Tensor:
        """G(M(y) (+) z) with M(y) = table[rows]: the first layer is linear per pixel, W (e (+) z) = W_e e + W_z z, and
        W_e table[rows] = (table W_e^T)[rows]. So the (B, e_dim, h, w) map e is never built: G's costliest layer shrinks
        from e_dim + L input channels to L. table (K + 1, e_dim), rows (B, h, w), z (B, L, h, w) -> (B, F, h, w)."""
        first, act, last = self
        W_e, W_z = first.weight[:, :table.shape[1], 0, 0], first.weight[:, table.shape[1]:]
        e_part = F.embedding(rows, table.to(W_e.dtype) @ W_e.T).permute(0, 3, 1, 2)  # W_e M(y), (B, hidden, h, w)
        return last(act(e_part + F.conv2d(z, W_z, first.bias)))  # = self(cat([M(y), z], 1))


class SIGN(nn.Module):
    """All six networks; ``forward(x)`` is inference, E -> SIM -> C, upsampled to the input. ``config``:
    every constructor argument as plain JSON, for ``from_config``. ``sim="none"`` drops SIM (ZS3Net-style:
    F_x = E(x), G draws pure noise); ``pe="ape-interp"`` needs ``train_size``, the training *image* size."""
    def __init__(self, embeddings: Tensor, *, num_seen: int, encoder: str = "resnet101",
                 pretrained: bool = False, feat_dim: int = 600, sim: str = "multihead",
                 pe: str = "rpe", pe_dim: int = 600, latent_dim: int | None = None, heads: int = 8,
                 hidden: int = 256, train_size: tuple[int, int] | None = None, rpe_c: float = 512.0,
                 rpe_endpoint: bool = False, small_width: int = 64, output_stride: int | None = None,
                 latent_path: str = "gate", small_context: str = "wide"):
        super().__init__()
        K, e_dim = embeddings.shape
        if encoder not in ENCODERS or sim not in ("none",) + SIM_ARCHS:
            raise ValueError(f"SIGN: encoder must be one of {tuple(ENCODERS)} and sim one of "
                             f"{('none',) + SIM_ARCHS}, got {encoder!r}, {sim!r}")
        if not 0 < num_seen <= K:
            raise ValueError(f"SIGN: num_seen must be in [1, {K}] (embeddings has {K} rows), got {num_seen}")
        if encoder != "small" and output_stride not in (None, 8):
            raise ValueError(f"SIGN: DeepLabV2 has output stride 8, got output_stride={output_stride}")
        latent_dim = latent_dim or feat_dim
        self.config = dict(num_classes=K, embed_dim=e_dim, num_seen=num_seen, encoder=encoder, pretrained=pretrained,
                           feat_dim=feat_dim, sim=sim, pe=pe, pe_dim=pe_dim, latent_dim=latent_dim, heads=heads,
                           hidden=hidden, train_size=list(train_size) if train_size else None, rpe_c=rpe_c,
                           rpe_endpoint=rpe_endpoint, small_width=small_width, output_stride=output_stride,
                           latent_path=latent_path, small_context=small_context)
        self.num_seen, self.latent_dim = num_seen, latent_dim
        self.E = (SmallEncoder(feat_dim, width=small_width, output_stride=output_stride or 4, context=small_context)
                  if encoder == "small" else DeepLabV2(feat_dim, depth=ENCODERS[encoder], pretrained=pretrained))
        self.SIM = None if sim == "none" else SIM(
            feat_dim, arch=sim, pe=pe, pe_dim=pe_dim, latent_dim=latent_dim, heads=heads,
            pe_train_size=self.feature_size(*train_size) if train_size else None,
            rpe_c=rpe_c, rpe_endpoint=rpe_endpoint, latent_path=latent_path)
        self.C = nn.Conv2d(feat_dim, K, 1)  # C: F_x -> K = seen + unseen logits, per pixel
        self.M = SemanticMapping(embeddings)
        self.G = Generator(e_dim + latent_dim, feat_dim, hidden)
        self.D = nn.Sequential(nn.Conv2d(feat_dim, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1))

    @classmethod
    def from_config(cls, config: dict, embeddings: Tensor | None = None) -> "SIGN":
        """Rebuild from ``config`` (every key ``SIGN.config`` holds); without ``embeddings`` M holds
        zeros until load_state_dict. Never downloads: weights come from the checkpoint."""
        missing = {"num_classes", "embed_dim", *inspect.signature(cls).parameters} - {"embeddings", *config}
        if missing:  # a constructor default would silently stand in for the saved value
            raise ValueError(f"SIGN.from_config: config lacks {sorted(missing)}")
        cfg = dict(config, pretrained=False)
        K, e_dim = cfg.pop("num_classes"), cfg.pop("embed_dim")
        embeddings = torch.zeros(K, e_dim) if embeddings is None else embeddings
        if tuple(embeddings.shape) != (K, e_dim):
            raise ValueError(f"SIGN.from_config: embeddings must be ({K}, {e_dim}), got {tuple(embeddings.shape)}")
        return cls(embeddings, **cfg)

    def first_classes(self, n: int) -> "SIGN":
        """A new SIGN that knows the first ``n`` classes only: M's and C's other rows dropped, every
        other weight this model's. Draws no random numbers."""
        with torch.random.fork_rng(devices=[]):
            cut = SIGN.from_config({**self.config, "num_classes": n})
        table, C = self.M.table, self.C  # table (K + 1, e_dim): the classes, then the zero row of label 255
        cut.load_state_dict({**self.state_dict(), "M.table": torch.cat([table[:n], table[-1:]]),  # (n + 1, e_dim)
                             "C.weight": C.weight[:n], "C.bias": C.bias[:n]})
        return cut.to(table.device)

    def with_classes(self, embeddings: Tensor) -> "SIGN":
        """A new SIGN with one unseen class appended per row of ``embeddings`` (n, e_dim): M's table gains
        the rows, C the outputs a fresh K + n class model draws (global RNG); every other weight is this one's."""
        K, table, C = self.config["num_classes"], self.M.table, self.C  # table (K + 1, e_dim)
        grown = SIGN.from_config({**self.config, "num_classes": K + len(embeddings)})
        grown.load_state_dict({**self.state_dict(),  # M's table (K + n + 1, e_dim), C's weight (K + n, F, 1, 1)
                               "M.table": torch.cat([table[:K], embeddings.to(table), table[K:]]),
                               "C.weight": torch.cat([C.weight, grown.C.weight[K:]]),
                               "C.bias": torch.cat([C.bias, grown.C.bias[K:]])})
        return grown.to(table.device)

    @property
    def seen_classes(self) -> list[int]:
        return list(range(self.num_seen))

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of E's output for an (height, width) image: every stride-2 conv rounds up."""
        return math.ceil(height / self.E.output_stride), math.ceil(width / self.E.output_stride)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(B, 3, H, W) -> F_x (B, F, h, w) and z, mu, logvar (B, L, h, w) (None without SIM)."""
        f = self.E(x)  # (B, F, h, w)
        return (f, None, None, None) if self.SIM is None else self.SIM(f)  # Eq. (1)

    def generate(self, labels: Tensor, z: Tensor | None = None) -> Tensor:
        """F^_x = G(M(y) (+) z) for labels at feature resolution, (B, h, w) -> (B, F, h, w). ``z=None`` draws
        z ~ N(0, 1), Eq. (2)'s prior (Transfer Learning Step; no SIM). z is detached: SIM learns from Eq. (4)."""
        rows = self.M.rows(labels)  # e = M(y) is the table's row for each pixel, (B, h, w)
        if z is None:
            z = torch.randn(len(rows), self.latent_dim, *rows.shape[1:], device=rows.device, dtype=self.M.table.dtype)
        return self.G.from_table(self.M.table, rows, z.detach())  # G(M(y) (+) z), (B, F, h, w)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> logits (B, K, H, W)
        logits = self.C(self.features(x)[0])  # (B, K, h, w)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- losses
def _full(t: Tensor) -> Tensor:
    """float32 for a half-precision tensor (``--amp``), any other unchanged. Every loss runs in
    float32: each loses digits or overflows in 8-10 bits of mantissa, and is cheap beside E."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_loss(mu: Tensor, logvar: Tensor, mask: Tensor | None = None) -> Tensor:
    """Eq. (2): KL(N(mu, sigma^2) || N(0, 1)) = -1/2 (1 + log sigma^2 - mu^2 - sigma^2),
    averaged over channels and over the pixels where ``mask`` (B, h, w) is true (all if None)."""
    mu, logvar = _full(mu), _full(logvar)  # exp(log sigma^2) overflows half precision
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())  # Eq. (2), (B, L, h, w)
    if mask is None:
        return kl.mean()
    m = mask[:, None].to(kl.dtype)  # (B, 1, h, w)
    return (kl * m).sum() / (m.sum() * kl.shape[1]).clamp_min(1)  # no pixel selected: 0 with a graph


def prediction_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = IGNORE) -> Tensor:
    """Eqs. (3), (9): CE = -log p_y per pixel; mean over non-ignored pixels, or with per-pixel
    ``weight`` (B, h, w) (AST, Eq. 17) sum(w CE) / sum(w). No valid pixel gives 0, not NaN."""
    if logits.shape[:1] + logits.shape[2:] != target.shape or weight is not None and weight.shape != target.shape:
        raise ValueError(f"prediction_loss: logits {tuple(logits.shape)}, target {tuple(target.shape)} and weight "
                         f"{None if weight is None else tuple(weight.shape)} differ in batch or spatial size")
    ce = F.cross_entropy(_full(logits), target, ignore_index=ignore_index, reduction="none")  # Eqs. (3), (9)
    valid = (target != ignore_index).to(ce.dtype)  # (B, h, w)
    w = valid if weight is None else weight.to(ce.dtype) * valid
    # tiny, not 1: a total weight of 1e-3 is legitimate; when it is 0 the numerator is 0 too
    return (w * ce).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


def sim_step_loss(logits: Tensor, target: Tensor, mu: Tensor | None, logvar: Tensor | None, *,
                  num_seen: int | None, alpha: float = 100.0, weight: Tensor | None = None,
                  kl_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. (4), Training Step (SIM): L_pred^train + alpha L_KLD, for E, SIM and C. ``num_seen``
    restricts the softmax to C^S as Eq. (3) states (None: all K classes, for self-training on unseen
    pseudo-labels); without SIM (mu None) L_KLD is 0. Returns the total and {"pred", "kld"} detached."""
    if num_seen is not None:
        if ((target >= num_seen) & (target != IGNORE)).any():
            raise ValueError(f"sim_step_loss: target holds a class >= num_seen={num_seen}")
        logits = logits[:, :num_seen]  # (B, |C^S|, h, w)
    pred = prediction_loss(logits, target, weight)  # Eq. (3)
    kld = kl_loss(mu, logvar, kl_mask) if mu is not None else logits.new_zeros(())  # Eq. (2)
    return pred + alpha * kld, {"pred": pred.detach(), "kld": kld.detach()}  # Eq. (4)


def _masked_bce(logits: Tensor, real: bool, mask: Tensor) -> Tensor:
    """Mean BCE-with-logits of D's map (B, 1, h, w) against all-real/all-fake on ``mask``."""
    logits = _full(logits[:, 0])  # (B, h, w)
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)), reduction="none")
    m = mask.to(bce.dtype)
    return (bce * m).sum() / m.sum().clamp_min(1)  # no labelled pixel: 0 with a graph


def discriminator_loss(D: nn.Module, real: Tensor, fake: Tensor, labels: Tensor) -> Tensor:
    """Eq. (7), D's side: D maximises E[log D(f)] + E[log(1 - D(f^))], i.e. minimises
    BCE(D(f), 1) + BCE(D(f^), 0) over labelled pixels. Features are detached: D only."""
    mask = labels != IGNORE  # (B, h, w)
    return _masked_bce(D(real.detach()), True, mask) + _masked_bce(D(fake.detach()), False, mask)  # Eq. (7)


def generator_loss(D: nn.Module, real: Tensor, fake: Tensor, labels: Tensor, seen_classes: Sequence[int], *,
                   beta: float = 50.0, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                   max_per_class: int = 256) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. (8), Training Step (G): L_adv + beta L_MMD, for G only. L_adv = -log D(f^) on labelled pixels,
    D held fixed; L_MMD is Eq. (5) over ``seen_classes`` between the real features (detached: E and SIM
    fixed) and the fake ones at the same pixels. Returns the total and {"adv", "mmd"} detached."""
    fake_logits = torch.func.functional_call(D, {n: p.detach() for n, p in D.named_parameters()}, (fake,))  # D fixed
    adv = _masked_bce(fake_logits, True, labels != IGNORE)  # Eq. (7), G's side
    # float32 even under autocast: ||x||^2 + ||y||^2 - 2 x.y cancels badly in half precision
    with torch.autocast(real.device.type, enabled=False):
        mmd = classwise_mmd(real.detach().float().permute(0, 2, 3, 1).flatten(0, 2),  # (B*h*w, F)
                            fake.float().permute(0, 2, 3, 1).flatten(0, 2), labels.reshape(-1), seen_classes,
                            sigmas=sigmas, max_per_class=max_per_class)  # Eq. (5)
    return adv + beta * mmd, {"adv": adv.detach(), "mmd": mmd.detach()}  # Eq. (8)


def transfer_loss(C: nn.Module, real: Tensor, target: Tensor, fake: Tensor, pseudo_target: Tensor,
                  weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. (10), Transfer Learning Step: L_pred^train(C(F_x), y) + L_pred^trans(C(F^_x), y^),
    softmax over all K classes; features detached (E, SIM, G fixed): C only. ``weight``
    (B, h, w) weights the real pixels (self-training's pseudo-labels, Eq. 17)."""
    train = prediction_loss(C(real.detach()), target, weight)  # Eq. (3)
    trans = prediction_loss(C(fake.detach()), pseudo_target)  # Eq. (9)
    return train + trans, {"train": train.detach(), "trans": trans.detach()}  # Eq. (10)


# ----------------------------------------------------------------------------- CLI
TABLE2 = {"conv": "5.25M", "attention": "5.24M", "self-attention": "4.60M", "multihead": "4.86M"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="SIGN networks: parameter counts of the SIM variants.")
    p.add_argument("--param-count", action="store_true", help="print the SIM sizes beside Table 2's")
    p.add_argument("--feat-dim", type=int, default=600, help="F, E's output channels (paper: 600)")
    p.add_argument("--pe-dim", type=int, default=600, help="P, PE channels (paper: 600)")
    p.add_argument("--latent-dim", type=int, default=None, help="L, z channels (default: F; the gate needs L = F)")
    p.add_argument("--heads", type=int, default=8, help="heads of the multihead SIM (default 8)")
    return p


def main(argv=None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.param_count:
        return parser.print_help()
    L = args.latent_dim or args.feat_dim
    print(f"SIM parameters (F={args.feat_dim}, P={args.pe_dim}, L={L}, heads={args.heads}, pe=rpe), including "
          f"the reparameterisation heads\n{'architecture':<16}{'ours':>12}{'Table 2':>10}")
    for arch in SIM_ARCHS:  # the gate has no parameters; only the side path allows L != F
        sim = SIM(args.feat_dim, arch=arch, pe_dim=args.pe_dim, latent_dim=L, heads=args.heads,
                  latent_path="gate" if L == args.feat_dim else "side")
        print(f"{arch:<16}{sum(p.numel() for p in sim.parameters()) / 1e6:>11.2f}M{TABLE2[arch]:>10}")


if __name__ == "__main__":
    main()
