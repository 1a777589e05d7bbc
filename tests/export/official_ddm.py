"""An independent, deliberately plain transcription of DDM's official forward pass, for tests.

Source: GuHuangAI/DDM-Public, ``unet/uncond_unet.py`` (commit 8bf8ee23e449, blob 78dea2a9):
``EDMPrecond`` wrapping ``DhariwalUNet`` (ADM encoder, two ``SpatialAtt`` decouple heads,
two decoders). Written anew from reading that file, as free functions over a state dict with
the official key names (``model.enc.16x16_block0.conv0.weight`` ...). It imports nothing from
edgediff on purpose: a mistake in the product's layers cannot cancel against itself here.
Inference only (dropout is the identity); runs in the dtype of the tensors it is given, so
tests can use it in float64 as the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# DhariwalUNet's keyword defaults in the official file.
DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4],
                num_blocks=3, attn_resolutions=[32, 16, 8])
HEAD_CHANNELS = 64      # channels_per_head; fewer channels than this means no attention


class Weights:
    """The state dict; remembers which keys were read so a test can ask for unused ones."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.read: set[str] = set()

    def __call__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.state[key]


# --- layers ----------------------------------------------------------------------------

def dense(w: Weights, name: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    y = x @ w(name + ".weight").T
    return y + w(name + ".bias") if bias else y


def group_norm(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    groups = min(32, x.shape[1] // 4)
    return F.group_norm(x, groups, w(name + ".weight"), w(name + ".bias"), eps=1e-5)


def conv(w: Weights, name: str, x: torch.Tensor, kernel: bool = True, up=False, down=False):
    """EDM's Conv2d, non-fused path: resample with the stored 2x2 filter first, then the
    'same'-padded convolution and its bias."""
    if up or down:
        filt = w(name + ".resample_filter")                       # (1, 1, 2, 2)
        ch = x.shape[1]
        pad = (filt.shape[-1] - 1) // 2
        if up:
            x = F.conv_transpose2d(x, 4 * filt.repeat(ch, 1, 1, 1), stride=2, padding=pad, groups=ch)
        else:
            x = F.conv2d(x, filt.repeat(ch, 1, 1, 1), stride=2, padding=pad, groups=ch)
    if kernel:
        weight = w(name + ".weight")
        x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        x = x + w(name + ".bias")[None, :, None, None]
    return x


def attention(w: Weights, name: str, h: torch.Tensor, heads: int) -> torch.Tensor:
    n, ch, height, width = h.shape
    d = ch // heads
    qkv = conv(w, name + ".qkv", group_norm(w, name + ".norm2", h))
    qkv = qkv.reshape(n * heads, d, 3, height * width)           # per head: (d, [q k v], HW)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = q.transpose(1, 2) @ k / math.sqrt(d)                 # (n*heads, HW query, HW key)
    mixed = v @ scores.softmax(dim=-1).transpose(1, 2)            # (n*heads, d, HW query)
    return conv(w, name + ".proj", mixed.reshape(n, ch, height, width)) + h


def res_block(w: Weights, name: str, x, emb, cin, cout, heads=0, up=False, down=False):
    """UNetBlock with adaptive scale/shift, skip_scale 1, optional attention afterwards."""
    h = conv(w, name + ".conv0", F.silu(group_norm(w, name + ".norm0", x)), up=up, down=down)
    scale, shift = dense(w, name + ".affine", emb)[:, :, None, None].chunk(2, dim=1)
    h = F.silu(group_norm(w, name + ".norm1", h) * (scale + 1) + shift)
    h = conv(w, name + ".conv1", h)
    if cin != cout or up or down:
        # 1x1 projection when the width changes, otherwise only the resampling
        x = conv(w, name + ".skip", x, kernel=cin != cout, up=up, down=down)
    h = h + x
    return attention(w, name, h, heads) if heads else h


def decouple(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    """nn.Sequential(3x3 conv, SpatialAtt); the caller adds x back."""
    y = conv(w, name + ".0", x)
    n, _, height, width = y.shape
    gate = conv(w, name + ".1.map", y)                            # (n, 1, H, W)
    q = conv(w, name + ".1.q_conv", gate).reshape(n, height * width, 1)
    k = conv(w, name + ".1.k_conv", gate).reshape(n, 1, height * width)
    pooled = torch.softmax(q @ k, dim=-1) @ gate.reshape(n, height * width, 1)   # no 1/sqrt(d)
    return F.softsign(pooled.reshape(n, 1, height, width)) * y


# --- architecture -----------------------------------------------------------------------

def _heads(channels: int, wanted: bool) -> int:
    return channels // HEAD_CHANNELS if wanted else 0


def encoder_layout(cfg: dict) -> list[tuple]:
    """(name, cin, cout, heads, down) per encoder entry; the first entry is the stem conv."""
    mc, res0 = cfg["model_channels"], cfg["img_resolution"]
    width = cfg["img_channels"]
    layout = []
    for level, mult in enumerate(cfg["channel_mult"]):
        res = res0 // 2 ** level
        if level == 0:
            layout.append((f"{res}x{res}_conv", width, mc * mult, 0, False))
            width = mc * mult
        else:
            layout.append((f"{res}x{res}_down", width, width, 0, True))
        for i in range(cfg["num_blocks"]):
            attn = res in cfg["attn_resolutions"]
            layout.append((f"{res}x{res}_block{i}", width, mc * mult, _heads(mc * mult, attn), False))
            width = mc * mult
    return layout


def decoder_layout(cfg: dict) -> list[tuple]:
    """(name, cout, heads, up, takes_skip) per decoder entry, both decoders alike."""
    mc, res0, mults = cfg["model_channels"], cfg["img_resolution"], cfg["channel_mult"]
    width = mc * mults[-1]
    layout = []
    for level in reversed(range(len(mults))):
        res = res0 // 2 ** level
        if level == len(mults) - 1:
            layout.append((f"{res}x{res}_in0", width, _heads(width, True), False, False))
            layout.append((f"{res}x{res}_in1", width, 0, False, False))
        else:
            layout.append((f"{res}x{res}_up", width, 0, True, False))
        for i in range(cfg["num_blocks"] + 1):
            attn = res in cfg["attn_resolutions"]
            width = mc * mults[level]
            layout.append((f"{res}x{res}_block{i}", width, _heads(width, attn), False, True))
    return layout


def embedding(w: Weights, cfg: dict, noise_labels, class_labels, augment_labels):
    half = cfg["model_channels"] // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / half)
    angles = noise_labels[:, None] * freqs.to(noise_labels.dtype)[None, :]
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    if cfg["augment_dim"] and augment_labels is not None:
        emb = emb + dense(w, "model.map_augment", augment_labels, bias=False)
    emb = dense(w, "model.map_layer1", F.silu(dense(w, "model.map_layer0", emb)))
    if cfg["label_dim"]:
        emb = emb + dense(w, "model.map_label", class_labels, bias=False)
    return F.silu(emb)


def decode(w: Weights, prefix: str, cfg: dict, x, skips: list, emb):
    for name, cout, heads, up, takes_skip in decoder_layout(cfg):
        cin = x.shape[1]
        if takes_skip:
            x = torch.cat([x, skips.pop()], dim=1)
            cin = x.shape[1]
        x = res_block(w, f"{prefix}.{name}", x, emb, cin, cout, heads=heads, up=up)
    return x


def unet(w: Weights, cfg: dict, x, noise_labels, class_labels=None, augment_labels=None):
    emb = embedding(w, cfg, noise_labels, class_labels, augment_labels)
    skips = []
    for name, cin, cout, heads, down in encoder_layout(cfg):
        key = f"model.enc.{name}"
        stem = name.endswith("_conv")
        x = conv(w, key, x) if stem else res_block(w, key, x, emb, cin, cout, heads, down=down)
        skips.append(x)
    x1 = decouple(w, "model.decouple1", x) + x
    x2 = decouple(w, "model.decouple2", x) + x
    f_c = decode(w, "model.dec", cfg, x1, list(skips), emb)
    f_c = conv(w, "model.out_conv", F.silu(group_norm(w, "model.out_norm", f_c)))
    f_eps = decode(w, "model.dec2", cfg, x2, list(skips), emb)
    f_eps = conv(w, "model.out_conv2", F.silu(group_norm(w, "model.out_norm2", f_eps)))
    return f_c, f_eps


def edm_precond(w: Weights, cfg: dict, x, t, class_labels=None, augment_labels=None):
    """EDMPrecond.forward with sigma = t: returns (C, eps).

    c_in = 1/sqrt(1+t); C = (t-1) x + t/sqrt(1+t) F_c; eps = sqrt(t) x + sqrt((1-t)/(1+t)) F_eps;
    the noise label is log t. Unconditional calls of a conditional model use a zero label row.
    """
    cfg = {**DEFAULTS, **cfg}
    t = t.to(x.dtype).reshape(-1, 1, 1, 1)
    if cfg["label_dim"] and class_labels is None:
        class_labels = torch.zeros(1, cfg["label_dim"], dtype=x.dtype)
    f_c, f_eps = unet(w, cfg, x / torch.sqrt(1 + t), t.log().flatten(), class_labels, augment_labels)
    c = (t - 1) * x + t / torch.sqrt(1 + t) * f_c
    eps = torch.sqrt(t) * x + torch.sqrt((1 - t) / (1 + t)) * f_eps
    return c, eps
