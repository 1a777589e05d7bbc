"""DDPM U-Net (Ho et al. 2020, arXiv 2006.11239) laid out like diffusers' ``UNet2DModel``.

The ``google/ddpm-*`` checkpoints are published in that layout, so module and parameter
names follow it (``down_blocks.N.resnets.M.conv1``, ``attentions.M.to_q``,
``downsamplers.0.conv``, ``time_embedding.linear_1`` ...) and the configuration is the
model's ``config.json`` as-is. The numerics follow diffusers: sinusoidal timestep embedding
with ``flip_sin_to_cos`` and ``freq_shift``, pre-norm ResNet blocks adding the projected
time embedding after conv1, single-block self-attention with a residual, nearest-neighbour
upsampling. diffusers itself is only a test-time peer; nothing here imports it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgediff.runtime.errors import InvalidInput

from .common import sinusoidal_embedding, timestep_frequencies
from .family import Family, ModelSpec
from .validation import Field, Schema, boolean, choice, fraction, pos_float, pos_int, rule


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added between; 1x1 shortcut if C changes."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb):                                   # (N, Cin, H, W), (N, T)
        h = self.conv1(F.silu(self.norm1(x)))                     # (N, Cout, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))                     # dropout: identity at inference
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        # The scale is 1 everywhere except the mid block when mid_block_scale_factor != 1;
        # skipping the division then keeps a no-op Div out of the exported graph.
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Attention(nn.Module):
    """Spatial self-attention over the H*W positions (diffusers' "deprecated attn block").

    ``to_out`` is a list so its Linear sits at ``to_out.0`` as in the checkpoints.
    """

    def __init__(self, ch: int, head_dim: int, groups: int, eps: float, rescale_output_factor: float = 1.0):
        super().__init__()
        self.heads, self.head_dim = ch // head_dim, head_dim
        if self.heads < 1:
            raise InvalidInput(f"attention_head_dim={head_dim} exceeds the {ch} channels of an attention block")
        inner = self.heads * head_dim                          # < ch when head_dim does not divide ch
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.to_q = nn.Linear(ch, inner)
        self.to_k = nn.Linear(ch, inner)
        self.to_v = nn.Linear(ch, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, ch)])
        self.rescale_output_factor = rescale_output_factor

    def _split(self, z, n):
        return z.reshape(n, -1, self.heads, self.head_dim).transpose(1, 2)   # (N, heads, L, d)

    def forward(self, x):                                         # (N, C, H, W)
        n, c, h, w = x.shape
        # Normalise the (N, C, L) view, not (N, C, H, W): same maths, but torch's CPU kernel
        # rounds differently for the two ranks and diffusers uses the former.
        z = self.group_norm(x.flatten(2)).transpose(1, 2)         # (N, L, C), L = H*W
        q, k, v = (self._split(proj(z), n) for proj in (self.to_q, self.to_k, self.to_v))
        # diffusers asks for an upcast softmax; computing attention in float32 honours that
        # when the module runs in half precision and is a no-op in float32.
        a = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        a = a.transpose(1, 2).reshape(n, -1, self.heads * self.head_dim)   # (N, L, inner)
        out = self.to_out[0](a).transpose(1, 2).reshape(n, c, h, w) + x
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; with padding 0 the input is first padded on the right and bottom
    only (the original TF DDPM's asymmetric "SAME"), so H and W halve exactly."""

    def __init__(self, ch: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):                                         # (N, C, H, W)
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)                                       # (N, C, H/2, W/2)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):                                         # (N, C, H, W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))   # (N, C, 2H, 2W)


def _attentions(ch: int, head_dim: int | None, groups: int, eps: float, n: int, scale: float = 1.0):
    """``n`` attention layers, or None for the plain (attention-free) block types."""
    if head_dim is None:
        return None
    return nn.ModuleList([Attention(ch, head_dim, groups, eps, scale) for _ in range(n)])


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D: resnets (each followed by attention in the Attn type)
    and an optional downsampler; every stage output is kept for the up path's skips."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, temb_ch: int, groups: int, eps: float,
                 head_dim: int | None, downsample_padding: int | None):
        super().__init__()
        self.attentions = _attentions(out_ch, head_dim, groups, eps, layers)
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps)
                                      for i in range(layers)])
        self.downsamplers = None
        if downsample_padding is not None:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, downsample_padding)])

    def forward(self, x, temb, skips: list):
        attentions = self.attentions or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(x, temb)
            if attn is not None:
                x = attn(x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: each resnet eats the running features concatenated with
    one skip (newest first); ``skip_chs`` lists those skips' channel counts in that order."""

    def __init__(self, prev_ch: int, out_ch: int, skip_chs: list[int], temb_ch: int, groups: int, eps: float,
                 head_dim: int | None, upsample: bool):
        super().__init__()
        layers = len(skip_chs)
        self.attentions = _attentions(out_ch, head_dim, groups, eps, layers)
        self.resnets = nn.ModuleList([ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip_chs[i], out_ch,
                                                    temb_ch, groups, eps) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, temb, skips: list):
        attentions = self.attentions or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)   # (N, Cout, H, W)
            if attn is not None:
                x = attn(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet, attention, resnet at the lowest resolution; ``scale`` divides every residual sum."""

    def __init__(self, ch: int, temb_ch: int, groups: int, attn_groups: int, eps: float,
                 head_dim: int | None, scale: float):
        super().__init__()
        self.attentions = _attentions(ch, head_dim, attn_groups, eps, 1, scale)
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups, eps, scale) for _ in range(2)])

    def forward(self, x, temb):                                   # (N, C, h, w)
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))            # (N, T)


def _head_dim(cfg: dict, ch: int, attention: bool) -> int | None:
    """Per-head width of a block's attention (None: no attention); unset means one head."""
    return (cfg["attention_head_dim"] or ch) if attention else None


class UNet2D(nn.Module):
    """diffusers' ``UNet2DModel`` layout; forward(sample, timestep[, class_labels]) -> (N, C_out, H, W).

    Takes a resolved config (see ``check_config``): diffusers' keyword arguments.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        chs = cfg["block_out_channels"]
        temb_ch = cfg["time_embedding_dim"] or 4 * chs[0]
        self.center_input_sample = cfg["center_input_sample"]
        self.flip_sin_to_cos = cfg["flip_sin_to_cos"]
        self.time_dim = chs[0]
        self.register_buffer("freqs", timestep_frequencies(chs[0], 10000, cfg["freq_shift"]), persistent=False)
        self.conv_in = nn.Conv2d(cfg["in_channels"], chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_ch)
        n_cls = cfg["num_class_embeds"]
        self.class_embedding = nn.Embedding(n_cls, temb_ch) if n_cls is not None else None
        skip_chs = self._make_down(cfg, temb_ch)
        self.mid_block = None
        if cfg["mid_block_type"] is not None:
            groups = cfg["norm_num_groups"]
            self.mid_block = UNetMidBlock2D(chs[-1], temb_ch, groups, cfg["attn_norm_num_groups"] or groups,
                                            cfg["norm_eps"], _head_dim(cfg, chs[-1], cfg["add_attention"]),
                                            cfg["mid_block_scale_factor"])
        self._make_up(cfg, temb_ch, skip_chs)
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], chs[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(chs[0], cfg["out_channels"], 3, padding=1)

    def _make_down(self, cfg: dict, temb_ch: int) -> list[int]:
        """Builds ``down_blocks``; returns the channel counts of the skips they keep, in order."""
        chs, layers = cfg["block_out_channels"], cfg["layers_per_block"]
        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]                                      # conv_in's output is the first skip
        for i, kind in enumerate(cfg["down_block_types"]):
            last = i == len(chs) - 1
            self.down_blocks.append(DownBlock(
                chs[max(i - 1, 0)], chs[i], layers, temb_ch, cfg["norm_num_groups"], cfg["norm_eps"],
                _head_dim(cfg, chs[i], kind.startswith("Attn")), None if last else cfg["downsample_padding"]))
            skip_chs += [chs[i]] * (layers + (not last))
        return skip_chs

    def _make_up(self, cfg: dict, temb_ch: int, skip_chs: list[int]):
        chs, layers = cfg["block_out_channels"], cfg["layers_per_block"]
        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for i, kind in enumerate(cfg["up_block_types"]):
            out = chs[-1 - i]
            mine = [skip_chs.pop() for _ in range(layers + 1)]  # the skips this block consumes
            self.up_blocks.append(UpBlock(
                prev, out, mine, temb_ch, cfg["norm_num_groups"], cfg["norm_eps"],
                _head_dim(cfg, out, kind.startswith("Attn")), upsample=i < len(chs) - 1))
            prev = out

    def embed(self, timestep, class_labels=None):
        emb = sinusoidal_embedding(timestep, self.freqs, self.time_dim, cos_first=self.flip_sin_to_cos)
        emb = self.time_embedding(emb)                           # (N, T)
        if (self.class_embedding is None) != (class_labels is None):
            raise InvalidInput("class labels must be given exactly when the U-Net is class-conditional "
                             f"(num_class_embeds {'set' if self.class_embedding is not None else 'unset'})")
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)
        return emb

    def forward(self, sample, timestep, class_labels=None):    # (N, C, H, W), (N,), (N,)
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed(timestep, class_labels)
        x = self.conv_in(sample)                                 # (N, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, skips)
        if self.mid_block is not None:
            x = self.mid_block(x, emb)                           # (N, C_last, H/2^k, W/2^k)
        for block in self.up_blocks:
            x = block(x, emb, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))      # (N, C_out, H, W)


class DDPMExport(nn.Module):
    """Export view: forward(x, t[, y]) -> (eps,) (docs/architecture.md contract)."""

    def __init__(self, unet: UNet2D):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return (self.unet(x, t, y),)


_DOWN_TYPES, _UP_TYPES = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")


def _block_kinds(types: list[str]) -> list[str]:
    # diffusers strips the legacy "UNetRes" prefix (UNetResDownBlock2D == DownBlock2D).
    return [k[7:] if k.startswith("UNetRes") else k for k in types]


def _check_block_types(cfg: dict) -> str | None:
    for key, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        for kind in _block_kinds(cfg[key]):
            if kind not in allowed:
                return f"unsupported {key} block type {kind!r}; supported: {', '.join(allowed)}"
        if len(cfg[key]) != len(cfg["block_out_channels"]):
            return (f"{key} has {len(cfg[key])} entries, needs one per block_out_channels "
                    f"{cfg['block_out_channels']}")
    return None


def _check_groups(cfg: dict) -> str | None:
    """GroupNorm needs its group count to divide every channel count it normalises."""
    groups, chs = cfg["norm_num_groups"], cfg["block_out_channels"]
    bad = [ch for ch in chs if ch % groups]
    if bad:
        return f"norm_num_groups {groups} does not divide block_out_channels entry {bad[0]}"
    attn_groups = cfg["attn_norm_num_groups"]
    if cfg["mid_block_type"] and cfg["add_attention"] and attn_groups and chs[-1] % attn_groups:
        return f"attn_norm_num_groups {attn_groups} does not divide the mid block's {chs[-1]} channels"
    return None


def _attention_widths(cfg: dict) -> list[int]:
    """Channel counts of every block that has attention (the head width must fit in them)."""
    chs = cfg["block_out_channels"]
    widths = [ch for ch, kind in zip(chs, _block_kinds(cfg["down_block_types"])) if kind.startswith("Attn")]
    widths += [ch for ch, kind in zip(chs[::-1], _block_kinds(cfg["up_block_types"])) if kind.startswith("Attn")]
    return widths + ([chs[-1]] if cfg["mid_block_type"] and cfg["add_attention"] else [])


def _check_head_dim(cfg: dict) -> str | None:
    head = cfg["attention_head_dim"]
    small = [w for w in _attention_widths(cfg) if head and head > w]
    if small:
        return f"attention_head_dim {head} exceeds the {small[0]} channels of an attention block"
    return None


def _check_sample_size(cfg: dict) -> str | None:
    size, step = cfg["sample_size"], 2 ** (len(cfg["block_out_channels"]) - 1)
    sides = [] if size is None else [size] * 2 if isinstance(size, int) else size
    if any(side % step for side in sides):
        return (f"sample_size {size} must be a multiple of 2**(len(block_out_channels)-1) = {step} "
                "(each down block halves it)")
    return None


# UNet2DModel's keyword arguments with diffusers' defaults (0.42), so a config.json that leaves
# a key out means what it means to diffusers. Keys with one choice are the only value we
# implement; dropout and num_train_timesteps (the "learned" embedding only) are inert here.
SCHEMA = Schema("ddpm", {
    "sample_size": Field("size", None, lo=1, optional=True), "in_channels": pos_int(3),
    "out_channels": pos_int(3), "center_input_sample": boolean(False),
    "time_embedding_type": choice("positional", "positional"), "time_embedding_dim": pos_int(None, optional=True),
    "freq_shift": Field("number", 0), "flip_sin_to_cos": boolean(True),
    "down_block_types": Field("strs", ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                              nonempty=True),
    "mid_block_type": choice("UNetMidBlock2D", "UNetMidBlock2D", None),
    "up_block_types": Field("strs", ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], nonempty=True),
    "block_out_channels": Field("ints", [224, 448, 672, 896], lo=1, nonempty=True),
    "layers_per_block": pos_int(2), "mid_block_scale_factor": pos_float(1),
    # other paddings change the downsampled size (the asymmetric 0 and symmetric 1 halve it)
    "downsample_padding": choice(1, 0, 1),
    "downsample_type": choice("conv", "conv"), "upsample_type": choice("conv", "conv"), "dropout": fraction(0.0),
    "act_fn": choice("silu", "silu", "swish"),                   # the same nn.SiLU in diffusers
    "attention_head_dim": pos_int(8, optional=True), "norm_num_groups": pos_int(32),
    "attn_norm_num_groups": pos_int(None, optional=True), "norm_eps": pos_float(1e-5),
    "resnet_time_scale_shift": choice("default", "default"), "add_attention": boolean(True),
    "class_embed_type": choice(None, None),
    # the last embedding row is our null label, so a conditional model needs two rows at least
    "num_class_embeds": Field("int", None, lo=2, optional=True),
    "num_train_timesteps": pos_int(None, optional=True),
}, rules=(
    _check_block_types, _check_groups, _check_head_dim, _check_sample_size,
    # the export contract: eps has the sample's shape (learned-variance U-Nets double C)
    rule(lambda c: c["out_channels"] == c["in_channels"],
         "out_channels {out_channels} must equal in_channels {in_channels} (the model predicts eps)"),
), unknown="unknown key(s) {keys}; UNet2DModel takes {allowed}", metadata="_")


def check_config(config: dict) -> dict:
    """A diffusers UNet2DModel config.json dict -> resolved keyword arguments, or ConfigError.

    Keys starting with "_" (``_class_name``, ``_diffusers_version`` ...) are metadata; a
    ``_class_name`` other than UNet2DModel is refused. Unknown keys are refused rather than
    silently ignored.
    """
    if isinstance(config, dict) and config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        SCHEMA.fail(f"_class_name {config['_class_name']!r} is not supported; only UNet2DModel")
    cfg = SCHEMA.check(config)
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    cfg["down_block_types"] = _block_kinds(cfg["down_block_types"])
    cfg["up_block_types"] = _block_kinds(cfg["up_block_types"])
    return cfg


def build(config: dict) -> DDPMExport:
    return DDPMExport(UNet2D(check_config(config))).eval()


def spec(config: dict) -> ModelSpec:
    cfg = check_config(config)
    size = cfg["sample_size"]
    if size is None:
        SCHEMA.fail("sample_size is required for export (the bundle records the sample shape)")
    h, w = (size, size) if isinstance(size, int) else size
    n_cls = cfg["num_class_embeds"]
    return ModelSpec(
        sample_shape=(cfg["in_channels"], h, w),
        outputs=("eps",),
        prediction="epsilon",
        time={"convention": "discrete", "min": 0, "max": 999},
        # The google/ddpm-* schedulers: "linear" betas 1e-4..0.02 over 1000 steps (Ho et al.).
        schedule={"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        # UNet2DModel has no guidance convention of its own: we reserve the last embedding
        # row as the null label (as DiT does), so num_class_embeds - 1 real classes remain.
        num_classes=None if n_cls is None else n_cls - 1,
        null_label=None if n_cls is None else n_cls - 1,
        space="pixel",
        # The google/ddpm-* scheduler configs clip the predicted x0 to [-1, 1] when sampling.
        extra={"clip_sample": True},
    )


_DDPM_COMMON = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False,
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "out_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
CONFIGS = {
    # google/ddpm-cifar10-32/config.json (35.7M parameters).
    "ddpm-cifar10-32": dict(
        _DDPM_COMMON, sample_size=32, block_out_channels=[128, 256, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    # google/ddpm-celebahq-256 and ddpm-church-256 (and their ddpm-ema-* twins): attention at 16x16.
    "ddpm-256": dict(
        _DDPM_COMMON, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
        down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4),
    # Registry fixture: 8x8, one channel, class-conditional (10 classes + null label).
    "tiny": dict(
        _DDPM_COMMON, sample_size=8, in_channels=1, out_channels=1, block_out_channels=[16, 32],
        layers_per_block=1, norm_num_groups=8, num_class_embeds=11,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"]),
}

FAMILY = Family(name="ddpm", build=build, spec=spec, configs=CONFIGS, fixture="tiny",
                official=lambda m: m.unet,
                description="DDPM U-Net (diffusers UNet2DModel layout, google/ddpm-* checkpoints)")
