"""lucidrains ``denoising_diffusion_pytorch.Unet``, with the parameter names of its checkpoints.

Written from the upstream design (lucidrains/denoising-diffusion-pytorch at faed4db, file
``denoising_diffusion_pytorch/denoising_diffusion_pytorch.py``), not copied: a U-Net of
ResNet blocks whose norm is an RMS norm scaled by sqrt(channels) times a learned gain ``g``,
time entering each block as a scale/shift after the first norm, linear attention (softmax of
q over features, of k over positions, plus learned memory key/values) at every level except
those marked ``full_attn`` (plain softmax attention with memory key/values; the middle always
uses it), pixel-unshuffle downsampling into a 1x1 conv and nearest upsampling into a 3x3 conv.

Module names follow upstream so ``state_dict`` keys match its checkpoints: ``init_conv``,
``time_mlp.{0,1,3}``, ``downs.i.{0,1,2,3}``, ``mid_block1``, ``mid_attn``, ``mid_block2``,
``ups.i.{0,1,2,3}``, ``final_res_block``, ``final_conv``.

The time input is what ``GaussianDiffusion`` passes: integer steps 0..T-1 (as float here).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .family import Family, ModelSpec
from .validation import ConfigError, Field, Schema, boolean, choice, pos_int, rule


# --- building blocks ------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Channel-wise L2 normalisation times sqrt(C) times a learned per-channel gain ``g``."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.g * self.scale


class SinusoidalPosEmb(nn.Module):
    """[sin | cos] of t times dim/2 geometric frequencies theta^(-i/(half-1))."""

    def __init__(self, dim: int, theta: float = 10000):
        super().__init__()
        self.dim, self.theta = dim, theta

    def forward(self, t):
        half = self.dim // 2
        step = math.log(self.theta) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device) * -step)     # float32, as upstream
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)                  # (N, dim)


class RandomOrLearnedSinusoidalPosEmb(nn.Module):
    """crowsonkb-style Fourier features: [t | sin(2 pi t w) | cos(2 pi t w)], w of size dim/2."""

    def __init__(self, dim: int, is_random: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2), requires_grad=not is_random)

    def forward(self, t):
        t = t[:, None]
        freqs = t * self.weights[None, :] * 2 * math.pi
        return torch.cat((t, freqs.sin(), freqs.cos()), dim=-1)             # (N, dim + 1)


class SpaceToDepth(nn.Module):
    """Each 2x2 patch into channels, ordered (c, row-in-patch, col-in-patch)."""

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * 4, h // 2, w // 2)


def downsample(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(SpaceToDepth(), nn.Conv2d(dim_in * 4, dim_out, 1))


def upsample(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


class Block(nn.Module):
    """conv3x3 -> RMSNorm -> optional (1 + scale, shift) -> SiLU -> dropout."""

    def __init__(self, dim: int, dim_out: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = RMSNorm(dim_out)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.dropout(self.act(x))


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, dropout=dropout)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, emb):
        scale, shift = self.mlp(emb)[:, :, None, None].chunk(2, dim=1)      # 2 x (N, C_out, 1, 1)
        h = self.block2(self.block1(x, (scale, shift)))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Efficient attention: softmax(q) over features, softmax(k) over positions (memory first)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.norm = RMSNorm(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, dim_head, num_mem_kv))
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), RMSNorm(dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        mem_k, mem_v = (m.unsqueeze(0).expand(b, -1, -1, -1) for m in self.mem_kv)
        k = torch.cat((mem_k, k), dim=-1)                                   # (N, H, D, M + T)
        v = torch.cat((mem_v, v), dim=-1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = k @ v.transpose(-1, -2)                                   # (N, H, D, E)
        out = context.transpose(-1, -2) @ q                                 # (N, H, E, T)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Softmax attention over positions with memory key/values; ``attend`` holds no weights."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.norm = RMSNorm(dim)
        self.attend = nn.Identity()          # a parameter-free slot, named as upstream's Attend
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w).transpose(-1, -2)
                   for z in self.to_qkv(self.norm(x)).chunk(3, dim=1))    # (N, H, T, D)
        mem_k, mem_v = (m.unsqueeze(0).expand(b, -1, -1, -1) for m in self.mem_kv)
        k = torch.cat((mem_k, k), dim=-2)
        v = torch.cat((mem_v, v), dim=-2)
        sim = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5               # (N, H, T, M + T)
        out = sim.softmax(dim=-1) @ v                                       # (N, H, T, D)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


def _per_level(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


class Unet(nn.Module):
    """The upstream ``Unet(...)`` constructor; forward(x, time, x_self_cond=None)."""

    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3,
                 self_condition=False, learned_variance=False, learned_sinusoidal_cond=False,
                 random_fourier_features=False, learned_sinusoidal_dim=16, sinusoidal_pos_emb_theta=10000,
                 dropout=0.0, attn_dim_head=32, attn_heads=4, full_attn=None, flash_attn=False):
        super().__init__()
        del flash_attn                      # fused kernel vs explicit softmax: the same function
        self.channels, self.self_condition = channels, self_condition
        init_dim = init_dim or dim
        self.init_conv = nn.Conv2d(channels * (2 if self_condition else 1), init_dim, 7, padding=3)
        widths = [init_dim] + [dim * m for m in dim_mults]
        pairs = list(zip(widths[:-1], widths[1:]))
        levels = len(dim_mults)

        time_dim = dim * 4
        self.random_or_learned_sinusoidal_cond = learned_sinusoidal_cond or random_fourier_features
        if self.random_or_learned_sinusoidal_cond:
            pos, fourier_dim = RandomOrLearnedSinusoidalPosEmb(learned_sinusoidal_dim, random_fourier_features), \
                learned_sinusoidal_dim + 1
        else:
            pos, fourier_dim = SinusoidalPosEmb(dim, theta=sinusoidal_pos_emb_theta), dim
        self.time_mlp = nn.Sequential(pos, nn.Linear(fourier_dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))

        full = _per_level(full_attn, levels) if full_attn else (False,) * (levels - 1) + (True,)
        heads, head_dims = _per_level(attn_heads, levels), _per_level(attn_dim_head, levels)

        def res(a, b):
            return ResnetBlock(a, b, time_emb_dim=time_dim, dropout=dropout)

        def attention(width, level):
            kind = Attention if full[level] else LinearAttention
            return kind(width, heads=heads[level], dim_head=head_dims[level])

        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()    # upstream's key order
        for i, (a, b) in enumerate(pairs):
            last = i == levels - 1
            self.downs.append(nn.ModuleList([
                res(a, a), res(a, a), attention(a, i),
                nn.Conv2d(a, b, 3, padding=1) if last else downsample(a, b)]))

        mid = widths[-1]
        self.mid_block1 = res(mid, mid)
        self.mid_attn = Attention(mid, heads=heads[-1], dim_head=head_dims[-1])
        self.mid_block2 = res(mid, mid)

        for j, (a, b) in enumerate(reversed(pairs)):
            level = levels - 1 - j
            last = j == levels - 1
            self.ups.append(nn.ModuleList([
                res(b + a, b), res(b + a, b), attention(b, level),
                nn.Conv2d(b, a, 3, padding=1) if last else upsample(b, a)]))

        self.out_dim = out_dim or channels * (2 if learned_variance else 1)
        self.final_res_block = res(init_dim * 2, init_dim)
        self.final_conv = nn.Conv2d(init_dim, self.out_dim, 1)

    def forward(self, x, time, x_self_cond=None):
        if self.self_condition:
            cond = torch.zeros_like(x) if x_self_cond is None else x_self_cond
            x = torch.cat((cond, x), dim=1)
        x = self.init_conv(x)
        first = x
        emb = self.time_mlp(time)
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, emb)
            skips.append(x)
            x = block2(x, emb)
            x = attn(x) + x
            skips.append(x)
            x = down(x)
        x = self.mid_block1(x, emb)
        x = self.mid_attn(x) + x
        x = self.mid_block2(x, emb)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), emb)
            x = block2(torch.cat((x, skips.pop()), dim=1), emb)
            x = attn(x) + x
            x = up(x)
        x = self.final_res_block(torch.cat((x, first), dim=1), emb)
        return self.final_conv(x)


class LucidExport(nn.Module):
    """Export view: forward(x, t) -> (prediction,); with self-conditioning forward(x, t,
    x_self_cond), the runtime feeding the previous step's x0 estimate (zeros at the first)."""

    def __init__(self, model: Unet):
        super().__init__()
        self.model = model

    def forward(self, x, t, x_self_cond=None):
        return (self.model(x, t, x_self_cond),)


# --- config ---------------------------------------------------------------------------------

def _int_or_ints(v) -> bool:
    ok = lambda e: isinstance(e, int) and not isinstance(e, bool) and e >= 1  # noqa: E731
    return ok(v) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(map(ok, v)))


def _full_attn_ok(v) -> bool:
    return v is None or isinstance(v, bool) or (isinstance(v, (list, tuple)) and all(isinstance(e, bool) for e in v))


def _levels_match(cfg, key) -> bool:
    v = cfg[key]
    return not isinstance(v, (list, tuple)) or len(v) == len(cfg["dim_mults"])


def _heads_ok(cfg) -> bool:
    return all(_int_or_ints(cfg[k]) for k in ("attn_heads", "attn_dim_head")) and _full_attn_ok(cfg["full_attn"])


# Upstream Unet(...) keywords, then the edgediff keys that describe the GaussianDiffusion the
# network was trained in (image_size, timesteps, objective, beta_schedule).
SCHEMA = Schema("lucid", {
    "dim": pos_int(), "init_dim": pos_int(None, optional=True), "out_dim": pos_int(None, optional=True),
    "dim_mults": Field("ints", (1, 2, 4, 8), lo=1, nonempty=True), "channels": pos_int(3),
    "self_condition": boolean(False), "learned_variance": boolean(False),
    "learned_sinusoidal_cond": boolean(False), "random_fourier_features": boolean(False),
    "learned_sinusoidal_dim": pos_int(16), "sinusoidal_pos_emb_theta": Field("number", 10000, lo=1, lo_open=True),
    "dropout": Field("number", 0.0, lo=0, hi=1), "attn_dim_head": Field("any", 32, words="a positive integer or a list of them"),
    "attn_heads": Field("any", 4, words="a positive integer or a list of them"),
    "full_attn": Field("any", None, words="null, a boolean or a list of booleans"),
    "flash_attn": boolean(False),
    "image_size": pos_int(32), "timesteps": Field("int", 1000, lo=2),
    "objective": choice("pred_noise", "pred_noise", "pred_v", "pred_x0"),
    "beta_schedule": choice("linear", "linear", "cosine", "sigmoid"),
}, rules=(
    rule(_heads_ok, "attn_heads and attn_dim_head must be positive integers or lists of them, "
         "full_attn null, a boolean or a list of booleans"),
    rule(lambda c: all(_levels_match(c, k) for k in ("attn_heads", "attn_dim_head", "full_attn")),
         "lists in attn_heads, attn_dim_head and full_attn need one entry per dim_mults level ({dim_mults})"),
    rule(lambda c: c["dim"] % 2 == 0 and c["dim"] >= 4,
         "dim {dim} must be even and >= 4 (the sinusoidal time embedding has dim/2 frequencies, at least 2)"),
    rule(lambda c: c["learned_sinusoidal_dim"] % 2 == 0, "learned_sinusoidal_dim {learned_sinusoidal_dim} must be even"),
    rule(lambda c: c["image_size"] % 2 ** (len(c["dim_mults"]) - 1) == 0,
         "image_size {image_size} must be divisible by 2^(len(dim_mults) - 1) for dim_mults {dim_mults}"),
), unknown="unknown lucid argument(s): {keys}; lucid takes {allowed}")

_UNET_KEYS = [k for k in SCHEMA.fields if k not in ("image_size", "timesteps", "objective", "beta_schedule")]

CONFIGS = {
    # README: Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True), GaussianDiffusion(image_size=128,
    # timesteps=1000) with the diffusion's defaults, pred_v and sigmoid.
    "readme-128": {"dim": 64, "dim_mults": [1, 2, 4, 8], "flash_attn": True, "image_size": 128,
                   "timesteps": 1000, "objective": "pred_v", "beta_schedule": "sigmoid"},
    "tiny": {"dim": 16, "dim_mults": [1, 2], "channels": 1, "image_size": 8, "attn_heads": 2,
             "attn_dim_head": 8, "objective": "pred_noise", "beta_schedule": "linear"},
}


def check_config(config: dict) -> dict:
    """Validated keywords with upstream defaults filled in (ConfigError, one line)."""
    return SCHEMA.check(config)


def unet_kwargs(cfg: dict) -> dict:
    out = {k: cfg[k] for k in _UNET_KEYS}
    for k in ("dim_mults", "attn_heads", "attn_dim_head", "full_attn"):
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def build(config: dict) -> LucidExport:
    return LucidExport(Unet(**unet_kwargs(check_config(config)))).eval()


# GaussianDiffusion's objective -> (the runtime's prediction type, the output's name)
OBJECTIVES = {"pred_noise": ("epsilon", "eps"), "pred_x0": ("sample", "x0"), "pred_v": ("v_prediction", "v")}


def _schedule(cfg: dict) -> dict:
    n = cfg["timesteps"]
    if cfg["beta_schedule"] == "linear":
        # linear_beta_schedule(T): linspace(1e-4, 0.02) scaled by 1000/T
        scale = 1000 / n
        return {"num_train_timesteps": n, "beta_schedule": "linear",
                "beta_start": scale * 0.0001, "beta_end": scale * 0.02}
    if cfg["beta_schedule"] == "cosine":
        # cosine_beta_schedule(T, s=0.008): 1 - abar(i+1)/abar(i), clipped to 0.999; the
        # normalisation by abar(0) cancels in the ratio, so this is diffusers' squaredcos_cap_v2
        # (equal to the last float64 bit or two)
        return {"num_train_timesteps": n, "beta_schedule": "squaredcos_cap_v2"}
    # sigmoid_beta_schedule(T) at its defaults (start -3, end 3, tau 1)
    return {"num_train_timesteps": n, "beta_schedule": "sigmoid"}


def spec(config: dict) -> ModelSpec:
    cfg = check_config(config)
    fail = SCHEMA.fail
    unstated = [k for k in ("objective", "beta_schedule") if k not in config]
    if unstated:   # GaussianDiffusion defaults to pred_v + sigmoid: a silent default would mislabel
        fail(f"say {' and '.join(unstated)} (how the checkpoint was trained; GaussianDiffusion's defaults "
             "are pred_v and sigmoid)")
    if cfg["learned_variance"] or (cfg["out_dim"] not in (None, cfg["channels"])):
        fail("learned_variance / out_dim != channels is not supported (GaussianDiffusion needs out_dim == channels)")
    if cfg["learned_sinusoidal_cond"] or cfg["random_fourier_features"]:
        fail("learned_sinusoidal_cond / random_fourier_features are for the continuous-time trainers, whose time "
             "convention the runtime lacks; GaussianDiffusion refuses them too")
    prediction, output = OBJECTIVES[cfg["objective"]]
    size, n = cfg["image_size"], cfg["timesteps"]
    return ModelSpec(
        sample_shape=(cfg["channels"], size, size),
        outputs=(output,),
        prediction=prediction,
        time={"convention": "discrete", "min": 0, "max": n - 1},
        schedule=_schedule(cfg),
        extra_inputs=("x_self_cond",) if cfg["self_condition"] else (),
        extra={"variance": "fixed_small", "objective": cfg["objective"],
               "lucid_beta_schedule": cfg["beta_schedule"],
               # GaussianDiffusion.ddim_sample re-derives the noise from the clipped x0
               "use_clipped_model_output": True},
    )


FAMILY = Family(name="lucid", build=build, spec=spec, configs=CONFIGS, fixture="tiny",
                official=lambda m: m.model,
                description="lucidrains denoising-diffusion-pytorch Unet (RMSNorm, linear attention)")
