"""ADM (Dhariwal & Nichol 2021, arXiv 2105.05233): openai/guided-diffusion ``UNetModel``.

Written for edgediff from the numerics of guided-diffusion ``guided_diffusion/unet.py`` and
``nn.py`` at commit 22e0df8183507e13a7813f8d38d51b072ca1e67c (MIT licence); no code is copied.
The module tree keeps the official names, so the released ``*.pt`` state dicts load strictly:
``time_embed.0/2``, ``label_emb``, ``input_blocks.I.J``, ``middle_block.J``, ``output_blocks.I.J``,
``out.0/2``; residual blocks hold ``in_layers``, ``emb_layers``, ``out_layers`` and
``skip_connection``; attention blocks hold ``norm``, ``qkv`` and ``proj_out``; resampling
layers hold ``conv`` (up) or ``op`` (down).

Numerics kept from upstream: cos-first timestep embedding of ``model_channels`` frequencies
(max period 10000), GroupNorm with 32 groups evaluated in float32, the FiLM ``scale_shift``
order ``norm(h) * (1 + scale) + shift``, q and k each scaled by ch^-1/4 before the product, the
legacy (heads, then q/k/v) and new (q/k/v, then heads) channel orders, and
``attention_resolutions`` given as downsample factors (``image_size // resolution``, as
``script_util.create_model`` computes them). Only ``dims=2`` is supported; ``use_checkpoint``
(a training-time memory trade) and ``use_fp16`` (upstream runs the torso in half precision) are
accepted and ignored: the export is FP32 and the FP16 rung converts it afterwards.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import sinusoidal_embedding, timestep_frequencies
from .family import Family, ModelSpec
from .validation import Field, Schema, boolean, choice, fraction, nonneg_int, pos_int, rule

GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups, always computed in float32 and cast back."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class Upsample(nn.Module):
    """Nearest 2x, then (with ``use_conv``) a 3x3 convolution named ``conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 convolution, or 2x2 average pooling without ``use_conv``; named ``op``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Norm-SiLU-conv, add (or FiLM with) the projected embedding, norm-SiLU-dropout-conv, skip.

    With ``up``/``down`` the resampling happens between the first SiLU and the first conv on
    the main path, and on the skip path before the skip projection.
    """

    takes_emb = True

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        film = 2 if use_scale_shift_norm else 1
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, film * out_channels))
        conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(conv_out.weight)
        nn.init.zeros_(conv_out.bias)
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout), conv_out)
        # the upstream ResBlock never sets use_conv, so a channel change is a 1x1 projection
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        norm1, act1, conv1 = self.in_layers
        h = act1(norm1(x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv1(h)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]     # (N, C or 2C, 1, 1)
        norm2, act2, drop, conv2 = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + e)
        return self.skip_connection(x) + conv2(drop(act2(h)))


class AttentionBlock(nn.Module):
    """Self-attention over all H*W positions with 1-D 1x1 convolutions for qkv and output."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            num_heads = channels // num_head_channels
        self.heads = num_heads
        self.new_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def attend(self, qkv):
        """(N, 3*C, T) -> (N, C, T). Legacy order: channels grouped per head as [q | k | v];
        new order: [all q | all k | all v], each then split into heads."""
        n, width, length = qkv.shape
        d = width // (3 * self.heads)                                # channels per head
        if self.new_order:
            q, k, v = (part.reshape(n * self.heads, d, length) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(n * self.heads, 3 * d, length).split(d, dim=1)
        s = 1.0 / math.sqrt(math.sqrt(d))                            # split between q and k
        logits = torch.bmm((q * s).transpose(1, 2), k * s)          # (N*heads, T_q, T_k)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = torch.bmm(v, weights.transpose(1, 2))                 # (N*heads, d, T_q)
        return out.reshape(n, self.heads * d, length)

    def forward(self, x):
        n, c, hgt, wid = x.shape
        flat = x.reshape(n, c, hgt * wid)
        h = self.proj_out(self.attend(self.qkv(self.norm(flat))))
        return (flat + h).reshape(n, c, hgt, wid)


class TimestepEmbedSequential(nn.Sequential):
    """A stage of layers; residual blocks also receive the embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if getattr(layer, "takes_emb", False) else layer(x)
        return x


class UNetModel(nn.Module):
    """The official ``UNetModel(...)`` keyword arguments and forward(x, timesteps, y=None)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        if dims != 2:
            raise ValueError("only dims=2 (images) is supported")
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        emb_dim = 4 * model_channels
        self.register_buffer("freqs", timestep_frequencies(model_channels), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in, ch_out=None, **kw):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        widths = [int(m * model_channels) for m in channel_mult]
        ch = widths[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips = [ch]                                                 # channels of every saved activation
        factor = 1                                                   # current downsample factor (ds)
        last = len(widths) - 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                stage = [res(ch, width)]
                ch = width
                if factor in attention_resolutions:
                    stage.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*stage))
                skips.append(ch)
            if level != last:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skips.append(ch)
                factor *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level in range(last, -1, -1):
            width = widths[level]
            for i in range(num_res_blocks + 1):
                stage = [res(ch + skips.pop(), width)]
                ch = width
                if factor in attention_resolutions:
                    stage.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    stage.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*stage))

        final = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        nn.init.zeros_(final.weight)
        nn.init.zeros_(final.bias)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), final)

    def forward(self, x, timesteps, y=None):
        if (y is None) != (self.num_classes is None):
            raise ValueError("give y exactly when the model is class-conditional")
        emb = self.time_embed(sinusoidal_embedding(timesteps, self.freqs, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        saved, h = [], x
        for stage in self.input_blocks:
            h = stage(h, emb)
            saved.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, saved.pop()], dim=1), emb)
        return self.out(h)


class ADMExport(nn.Module):
    """Export view: ``eps`` and, when out_channels doubles in_channels (learn_sigma), ``var``
    (the learned_range interpolation value, as DiT's)."""

    def __init__(self, model: UNetModel):
        super().__init__()
        self.model = model

    def forward(self, x, t, y=None):
        out = self.model(x, t, y)                                    # (N, C_out, H, W)
        c = self.model.in_channels
        if self.model.out_channels == c:
            return (out,)
        return out[:, :c], out[:, c:]


# --- configuration ------------------------------------------------------------------------------

def _widths(cfg) -> list[int]:
    return [int(m * cfg["model_channels"]) for m in cfg["channel_mult"]]


def _check_channel_mult(cfg) -> str | None:
    mult = cfg["channel_mult"]
    ok = isinstance(mult, (list, tuple)) and len(mult) > 0 and all(
        isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m > 0 for m in mult)
    if not ok:
        return f"channel_mult must be a non-empty list of positive numbers, got {mult!r}"
    bad = [w for w in _widths(cfg) if w < GROUPS or w % GROUPS]
    if bad:
        return (f"channel_mult {list(mult)} with model_channels {cfg['model_channels']} gives widths "
                f"{_widths(cfg)}; each must be a positive multiple of {GROUPS} (GroupNorm32)")
    return None


def _check_image_size(cfg) -> str | None:
    if _check_channel_mult(cfg):
        return None
    step = 2 ** (len(cfg["channel_mult"]) - 1)
    if cfg["image_size"] % step:
        return f"image_size {cfg['image_size']} must be divisible by {step} ({len(cfg['channel_mult'])} levels)"
    return None


def _check_attention(cfg) -> str | None:
    if _check_channel_mult(cfg):
        return None
    widths = _widths(cfg)
    factors = [2 ** i for i in range(len(widths))]
    stray = [f for f in cfg["attention_resolutions"] if f not in factors]
    if stray:
        return (f"attention_resolutions {list(cfg['attention_resolutions'])} are downsample factors "
                f"(image_size // resolution); {stray[0]} is not one of this model's {factors}")
    used = {w for w, f in zip(widths, factors) if f in cfg["attention_resolutions"]}
    nhc = cfg["num_head_channels"]
    if nhc != -1:
        for w in sorted(used | {widths[-1]}):
            if w % nhc:
                return f"num_head_channels {nhc} must divide the attention width {w}"
        return None
    for key, heads, widths_here in (("num_heads", cfg["num_heads"], used | {widths[-1]}),
                                    ("num_heads_upsample", cfg["num_heads_upsample"], used)):
        heads = cfg["num_heads"] if heads == -1 else heads
        for w in sorted(widths_here):
            if w % heads:
                return f"{key} {heads} must divide the attention width {w}"
    return None


# The official UNetModel(...) keyword arguments: types, bounds and defaults (checked against the
# constructor signature by the tests). "_noise_schedule" (metadata, not a constructor argument)
# names the diffusion schedule a named config was trained with: "linear" (default) or "cosine".
SCHEMA = Schema("adm", {
    "image_size": pos_int(), "in_channels": pos_int(), "model_channels": pos_int(),
    "out_channels": pos_int(), "num_res_blocks": nonneg_int(),
    "attention_resolutions": Field("ints", lo=1, words="a list of downsample factors (positive integers)"),
    "dropout": fraction(0), "channel_mult": Field("any", (1, 2, 4, 8), words="a list of positive numbers"),
    "conv_resample": boolean(True), "dims": choice(2, 2), "num_classes": pos_int(None, optional=True),
    "use_checkpoint": boolean(False), "use_fp16": boolean(False), "num_heads": pos_int(1),
    "num_head_channels": Field("int", -1, lo=-1, words="-1 or a positive integer"),
    "num_heads_upsample": Field("int", -1, lo=-1, words="-1 or a positive integer"),
    "use_scale_shift_norm": boolean(False), "resblock_updown": boolean(False),
    "use_new_attention_order": boolean(False),
}, rules=(
    rule(lambda c: c["num_head_channels"] != 0, "num_head_channels must be -1 or a positive integer, got 0"),
    rule(lambda c: c["num_heads_upsample"] != 0, "num_heads_upsample must be -1 or a positive integer, got 0"),
    _check_channel_mult, _check_image_size, _check_attention,
    # the export contract: eps has the sample's shape; learn_sigma doubles the channels (eps, var)
    rule(lambda c: c["out_channels"] in (c["in_channels"], 2 * c["in_channels"]),
         "out_channels {out_channels} must be in_channels {in_channels} or twice it (learn_sigma)"),
), unknown="unknown UNetModel argument(s): {keys}; UNetModel takes {allowed}", metadata="_")

SCHEDULES = {
    # gaussian_diffusion.get_named_beta_schedule for 1000 steps
    "linear": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
}


def check_config(config: dict) -> dict:
    """Validated UNetModel keyword arguments with the official defaults filled in (ConfigError)."""
    cfg = SCHEMA.check(config)
    cfg["channel_mult"] = tuple(cfg["channel_mult"])
    cfg["attention_resolutions"] = tuple(cfg["attention_resolutions"])
    return cfg


def _schedule_name(config) -> str:
    name = config.get("_noise_schedule", "linear") if isinstance(config, dict) else "linear"
    if name not in SCHEDULES:
        SCHEMA.fail(f"_noise_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return name


def build(config: dict) -> ADMExport:
    return ADMExport(UNetModel(**check_config(config))).eval()


def spec(config: dict) -> ModelSpec:
    cfg = check_config(config)
    schedule = SCHEDULES[_schedule_name(config)]
    c, size = cfg["in_channels"], cfg["image_size"]
    learn_sigma = cfg["out_channels"] == 2 * c
    return ModelSpec(
        sample_shape=(c, size, size),
        outputs=("eps", "var") if learn_sigma else ("eps",),
        prediction="epsilon",
        time={"convention": "discrete", "min": 0, "max": 999},
        schedule=dict(schedule),
        num_classes=cfg["num_classes"],
        null_label=None,                  # trained without label dropout: no classifier-free guidance
        space="pixel",
        extra={"variance": "learned_range" if learn_sigma else "fixed_small", "clip_sample": True},
    )


# Named configs: the README's MODEL_FLAGS turned into UNetModel arguments as
# script_util.create_model does (channel_mult from image_size, attention at image_size // res,
# num_heads 4 from model_and_diffusion_defaults where the flags do not set it).
def _published(image_size, model_channels, channel_mult, resolutions, *, num_classes=1000, num_heads=4,
               num_head_channels=64, dropout=0.0, use_fp16=True, use_new_attention_order=False,
               schedule="linear") -> dict:
    cfg = dict(SCHEMA.defaults(), image_size=image_size, in_channels=3, model_channels=model_channels,
               out_channels=6, num_res_blocks=2, attention_resolutions=[image_size // r for r in resolutions],
               dropout=dropout, channel_mult=list(channel_mult), num_classes=num_classes, use_fp16=use_fp16,
               num_heads=num_heads, num_head_channels=num_head_channels, use_scale_shift_norm=True,
               resblock_updown=True, use_new_attention_order=use_new_attention_order)
    return {**cfg, "_noise_schedule": schedule}


_RES = (32, 16, 8)
_LSUN = dict(image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), resolutions=_RES, num_classes=None)
CONFIGS = {
    "64x64": dict(_published(64, 192, (1, 2, 3, 4), _RES, dropout=0.1, use_new_attention_order=True,
                             schedule="cosine"), num_res_blocks=3),
    "128x128": _published(128, 256, (1, 1, 2, 3, 4), _RES, num_head_channels=-1),
    "256x256": _published(256, 256, (1, 1, 2, 2, 4, 4), _RES),
    "256x256-uncond": _published(256, 256, (1, 1, 2, 2, 4, 4), _RES, num_classes=None),
    "512x512": _published(512, 256, (0.5, 1, 1, 2, 2, 4, 4), _RES, use_fp16=False),
    "lsun-bedroom": _published(**_LSUN, dropout=0.1),
    "lsun-cat": _published(**_LSUN, dropout=0.1),
    "lsun-horse": _published(**_LSUN, dropout=0.1),
    "lsun-horse-nodropout": _published(**_LSUN),
    # the registry fixture: 16x16, two levels, attention at ds 2, learned sigma, 10 classes
    "tiny": dict(SCHEMA.defaults(), image_size=16, in_channels=3, model_channels=32, out_channels=6,
                 num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2], num_classes=10,
                 num_heads=2, use_scale_shift_norm=True, resblock_updown=True),
}

FAMILY = Family(name="adm", build=build, spec=spec, configs=CONFIGS, fixture="tiny",
                official=lambda m: m.model,
                description="ADM (openai/guided-diffusion UNetModel): pixel U-Net, learned sigma")
