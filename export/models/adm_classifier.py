"""ADM noisy-image classifier (Dhariwal & Nichol 2021, classifier guidance): guided-diffusion's
``EncoderUNetModel``, the half U-Net that predicts the class of a noised image x_t at step t.

Written for edgediff from the numerics of guided-diffusion ``guided_diffusion/unet.py``
(``EncoderUNetModel``, ``AttentionPool2d``, ``QKVAttention``) and ``script_util.py``
(``create_classifier``, ``classifier_defaults``) at commit 22e0df8183507e13a7813f8d38d51b072ca1e67c
(MIT licence); no code is copied. The torso reuses the ``adm`` family's blocks (same numerics as
``UNetModel``'s input half), so the released ``*_classifier.pt`` state dicts load strictly:
``time_embed.0/2``, ``input_blocks.I.J``, ``middle_block.J`` and the head ``out.*``:

- ``pool="attention"`` (every published classifier): GroupNorm32, SiLU, then ``out.2`` an
  attention pool (CLIP's): the spatial mean is prepended as a query token, a learned
  ``positional_embedding`` (C, HW + 1) is added, ``qkv_proj`` / ``c_proj`` are 1x1 Conv1d, the
  attention is the q/k/v-then-heads order of heads of ``num_head_channels`` each, and the
  logits are the first token's output;
- ``"adaptive"``: GroupNorm32, SiLU, global average pool, 1x1 conv ``out.3``, flatten;
- ``"spatial"`` / ``"spatial_v2"``: the spatial means of every input block and the middle
  block concatenated, then Linear(·, 2048), ReLU (v2: GroupNorm32 and SiLU), Linear(2048, K).

``use_checkpoint`` and ``use_fp16`` are accepted and ignored (the export is FP32), as in ``adm``;
``num_heads_upsample`` is accepted and unused, as upstream.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import adm
from .common import sinusoidal_embedding, timestep_frequencies
from .validation import Schema, choice

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class AttentionPool2d(nn.Module):
    """(N, C, H, W) -> (N, K): attention over [mean token, H*W tokens], output of the mean token."""

    def __init__(self, spatial: int, channels: int, head_channels: int, out_channels: int | None = None):
        super().__init__()
        # upstream draws randn / sqrt(C); loading a checkpoint replaces it
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial * spatial + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels or channels, 1)
        self.heads = channels // head_channels

    def forward(self, x):
        n, c = x.shape[:2]
        tokens = x.reshape(n, c, -1)                                 # (N, C, HW)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)   # (N, C, HW+1)
        tokens = tokens + self.positional_embedding[None].to(tokens.dtype)
        qkv = self.qkv_proj(tokens)                                  # (N, 3C, T)
        length, d = qkv.shape[-1], c // self.heads
        q, k, v = (part.reshape(n * self.heads, d, length) for part in qkv.chunk(3, dim=1))
        s = 1.0 / math.sqrt(math.sqrt(d))                            # split between q and k
        logits = torch.bmm((q * s).transpose(1, 2), k * s)          # (N*heads, T_q, T_k)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(n, c, length)   # (N, C, T)
        return self.c_proj(out)[:, :, 0]                             # (N, K)


class EncoderUNetModel(nn.Module):
    """The official ``EncoderUNetModel(...)`` keyword arguments and forward(x, timesteps) -> logits."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, pool="adaptive"):
        super().__init__()
        if dims != 2:
            raise ValueError("only dims=2 (images) is supported")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.model_channels, self.out_channels, self.pool = model_channels, out_channels, pool
        emb_dim = 4 * model_channels
        self.register_buffer("freqs", timestep_frequencies(model_channels), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

        def res(ch_in, ch_out=None, **kw):
            return adm.ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch):
            return adm.AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order)

        widths = [int(m * model_channels) for m in channel_mult]
        ch = widths[0]
        self.input_blocks = nn.ModuleList([adm.TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        features = ch                                                # width of the spatial pools' input
        factor = 1                                                   # current downsample factor (ds)
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                stage = [res(ch, width)]
                ch = width
                if factor in attention_resolutions:
                    stage.append(attn(ch))
                self.input_blocks.append(adm.TimestepEmbedSequential(*stage))
                features += ch
            if level != len(widths) - 1:
                down = res(ch, ch, down=True) if resblock_updown else adm.Downsample(ch, conv_resample, ch)
                self.input_blocks.append(adm.TimestepEmbedSequential(down))
                features += ch
                factor *= 2
        self.middle_block = adm.TimestepEmbedSequential(res(ch), attn(ch), res(ch))
        features += ch
        self.out = self._head(pool, ch, features, out_channels, image_size // factor, num_head_channels)

    @staticmethod
    def _head(pool, ch, features, out_channels, spatial, head_channels) -> nn.Sequential:
        if pool == "adaptive":
            final = nn.Conv2d(ch, out_channels, 1)
            nn.init.zeros_(final.weight)
            nn.init.zeros_(final.bias)
            return nn.Sequential(adm.GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)), final, nn.Flatten())
        if pool == "attention":
            return nn.Sequential(adm.GroupNorm32(ch), nn.SiLU(),
                                 AttentionPool2d(spatial, ch, head_channels, out_channels))
        hidden = [nn.ReLU()] if pool == "spatial" else [adm.GroupNorm32(2048), nn.SiLU()]
        return nn.Sequential(nn.Linear(features, 2048), *hidden, nn.Linear(2048, out_channels))

    def forward(self, x, timesteps):
        emb = self.time_embed(sinusoidal_embedding(timesteps, self.freqs, self.model_channels))
        spatial = self.pool.startswith("spatial")
        means, h = [], x
        for stage in self.input_blocks:
            h = stage(h, emb)
            if spatial:
                means.append(h.mean(dim=(2, 3)))                     # (N, C_i)
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))                # (N, K)
        return self.out(h)                                           # (N, K)


class ClassifierGrad(nn.Module):
    """Export view: grad = ∇x log softmax(classifier(x, t))[y], per sample (the gradient that
    guided-diffusion's ``cond_fn`` returns before multiplying by the classifier scale).

    Autograd runs inside forward, so tracing it puts the backward pass into the graph. Each
    sample's log-probability depends only on its own x, so the gradient of their sum is the
    per-sample gradient."""

    def __init__(self, classifier: EncoderUNetModel):
        super().__init__()
        self.classifier = classifier

    def forward(self, x, t, y):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.classifier(x_in, t)                        # (N, K)
            # picked by a one-hot product, not a gather: the gather's backward is a scatter-add,
            # which ONNX Runtime's CPU provider cannot run in FP16
            picked = torch.nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)    # (N, K)
            chosen = (torch.log_softmax(logits, dim=-1) * picked).sum()
            (grad,) = torch.autograd.grad(chosen, x_in)
        return (grad,)                                               # (N, C, H, W)


# --- configuration ------------------------------------------------------------------------------

def _check_heads(cfg) -> str | None:
    if adm._check_channel_mult(cfg):
        return None
    widths = adm._widths(cfg)
    used = {w for i, w in enumerate(widths) if 2 ** i in cfg["attention_resolutions"]} | {widths[-1]}
    nhc = cfg["num_head_channels"]
    for w in sorted(used):
        if nhc != -1 and w % nhc:
            return f"num_head_channels {nhc} must divide the attention width {w}"
        if nhc == -1 and w % cfg["num_heads"]:
            return f"num_heads {cfg['num_heads']} must divide the attention width {w}"
    return None


def _check_pool(cfg) -> str | None:
    if cfg["pool"] == "attention" and cfg["num_head_channels"] == -1:
        return "pool 'attention' needs num_head_channels (the attention pool's head width), got -1"
    return None


def _check_factors(cfg) -> str | None:
    if adm._check_channel_mult(cfg):
        return None
    factors = [2 ** i for i in range(len(cfg["channel_mult"]))]
    stray = [f for f in cfg["attention_resolutions"] if f not in factors]
    if stray:
        return (f"attention_resolutions {list(cfg['attention_resolutions'])} are downsample factors "
                f"(image_size // resolution); {stray[0]} is not one of this model's {factors}")
    return None


# UNetModel's arguments (adm.SCHEMA) without num_classes, plus pool; the tests check them
# against the constructor signature.
SCHEMA = Schema("adm classifier", {
    **{k: f for k, f in adm.SCHEMA.fields.items() if k != "num_classes"}, "pool": choice("adaptive", *POOLS),
}, rules=(
    *adm.SCHEMA.rules[:2],             # num_head_channels / num_heads_upsample not 0
    adm._check_channel_mult, adm._check_image_size, _check_factors, _check_heads, _check_pool,
), unknown="unknown EncoderUNetModel argument(s): {keys}; EncoderUNetModel takes {allowed}", metadata="_")


def check_config(config: dict) -> dict:
    """Validated EncoderUNetModel keyword arguments, official defaults filled in (ConfigError)."""
    cfg = SCHEMA.check(config)
    cfg["channel_mult"] = tuple(cfg["channel_mult"])
    cfg["attention_resolutions"] = tuple(cfg["attention_resolutions"])
    if cfg["out_channels"] < 2:
        SCHEMA.fail(f"out_channels (the number of classes) must be ≥ 2, got {cfg['out_channels']}")
    return cfg


def build(config: dict) -> EncoderUNetModel:
    return EncoderUNetModel(**check_config(config)).eval()


# script_util.create_classifier: channel_mult from image_size, attention at image_size // res.
_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4), 512: (0.5, 1, 1, 2, 2, 4, 4)}


def _published(image_size: int, depth: int = 2) -> dict:
    """classifier_defaults() (width 128, attention at 32,16,8, scale-shift norm, ResBlock
    resampling, attention pool) at ``image_size``; the README samples 64x64 with depth 4."""
    return dict(SCHEMA.defaults(), image_size=image_size, in_channels=3, model_channels=128, out_channels=1000,
                num_res_blocks=depth, attention_resolutions=[image_size // r for r in (32, 16, 8)],
                channel_mult=list(_MULT[image_size]), num_head_channels=64, use_scale_shift_norm=True,
                resblock_updown=True, pool="attention")


CONFIGS = {
    "64x64": _published(64, depth=4),
    "128x128": _published(128),
    "256x256": _published(256),
    "512x512": _published(512),
    # the test fixture: 16x16, two levels, attention at ds 2 and in the pool, 10 classes
    "tiny": dict(SCHEMA.defaults(), image_size=16, in_channels=3, model_channels=32, out_channels=10,
                 num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=32,
                 use_scale_shift_norm=True, resblock_updown=True, pool="attention"),
}
