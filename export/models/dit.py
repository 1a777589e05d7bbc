"""DiT (Peebles & Xie 2023, arXiv 2212.09748) laid out like facebookresearch/DiT ``models.py``.

Module and parameter names follow the official checkpoints (``x_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.N.adaLN_modulation.1`` ...), and
the numerics follow the official code: cos-first timestep embedding with 256 frequencies,
tanh-GELU MLPs, LayerNorm(eps=1e-6, no affine), patches unpacked as (h, w, p, q, c).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .common import sinusoidal_embedding, timestep_frequencies
from .family import Family, ModelSpec
from .validation import Schema, boolean, fraction, pos_float, pos_int, rule


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)   # (N, T, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to tokens in row-major (h, w) order."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)
        self.num_patches = (input_size // patch_size) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)           # (N, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.dim = frequency_embedding_size
        self.register_buffer("freqs", timestep_frequencies(self.dim), persistent=False)

    def forward(self, t):
        return self.mlp(sinusoidal_embedding(t, self.freqs, self.dim))   # (N, D)


class LabelEmbedder(nn.Module):
    """Class table; one extra row (index num_classes) is the null label when trained with dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y):
        return self.embedding_table(y)                           # (N, D)


class Attention(nn.Module):
    """timm-style multi-head self-attention (fused qkv, output projection)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)           # 3 × (N, H, T, Dh)
        attn = (q * self.scale) @ k.transpose(-2, -1)            # (N, H, T, T)
        x = attn.softmax(dim=-1) @ v                             # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))     # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (six modulation vectors from c)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)             # 6 × (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))   # (N, T, p*p*C_out)


def pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos table (MAE/DiT layout): first half encodes the column index w,
    second half the row index h, each as [sin | cos]; float64 like the official code."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def encode(pos):
        out = np.outer(pos.reshape(-1), omega)                   # (T, D/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)  # (T, D)


class DiT(nn.Module):
    """The official ``DiT(...)`` constructor and forward(x, t, y) -> (N, C_out, H, W)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        table = pos_embed_2d(hidden_size, int(num_patches ** 0.5))
        self.pos_embed = nn.Parameter(torch.from_numpy(table).float().unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        n, t, _ = x.shape
        p, c = self.patch_size, self.out_channels
        h = int(t ** 0.5)
        x = x.reshape(n, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4)   # (N, C, h, p, w, p)
        return x.reshape(n, c, h * p, h * p)                        # (N, C, H, W)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed                  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)              # (N, D)
        for block in self.blocks:
            x = block(x, c)                                      # (N, T, D)
        return self.unpatchify(self.final_layer(x, c))           # (N, C_out, H, W)


class DiTExport(nn.Module):
    """Export view: named outputs ``eps`` and, with learned sigma, ``var`` (the variance interpolation value, docs/architecture.md)."""

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        out = self.model(x, t, y)                                # (N, C_out, H, W)
        c = self.model.in_channels
        if self.model.out_channels == c:
            return (out,)
        return out[:, :c], out[:, c:]


# The official DiT(...) keyword arguments: types, bounds and defaults (checked against the
# constructor signature by the tests). DiT is always class-conditional: num_classes >= 1.
SCHEMA = Schema("dit", {
    "input_size": pos_int(32), "patch_size": pos_int(2), "in_channels": pos_int(4),
    "hidden_size": pos_int(1152), "depth": pos_int(28), "num_heads": pos_int(16),
    "mlp_ratio": pos_float(4.0), "class_dropout_prob": fraction(0.1), "num_classes": pos_int(1000),
    "learn_sigma": boolean(True),
}, rules=(
    # a remainder would be cropped away: the model would return a smaller image than bundle.json says
    rule(lambda c: c["input_size"] % c["patch_size"] == 0,
         "patch_size {patch_size} must divide input_size {input_size}"),
    rule(lambda c: c["hidden_size"] % c["num_heads"] == 0,
         "hidden_size {hidden_size} must be divisible by num_heads {num_heads}"),
    # the 2-D sin-cos position table has four quarters (sin/cos of rows and of columns)
    rule(lambda c: c["hidden_size"] % 4 == 0, "hidden_size {hidden_size} must be divisible by 4"),
    rule(lambda c: int(c["hidden_size"] * c["mlp_ratio"]) >= 1,
         "mlp_ratio {mlp_ratio} leaves the MLP of hidden_size {hidden_size} without units"),
), unknown="unknown DiT argument(s): {keys}; DiT takes {allowed}")
_DEFAULTS = SCHEMA.defaults()
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
CONFIGS = {f"DiT-{s}/{p}": dict(_DEFAULTS, depth=d, hidden_size=h, num_heads=n, patch_size=p)
           for s, (d, h, n) in _SIZES.items() for p in (2, 4, 8)}
CONFIGS["tiny"] = dict(_DEFAULTS, input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                       num_heads=2, num_classes=10)


def check_config(config: dict) -> dict:
    """Validated DiT keyword arguments with the official defaults filled in (ConfigError)."""
    return SCHEMA.check(config)


def build(config: dict) -> DiTExport:
    return DiTExport(DiT(**check_config(config))).eval()


def spec(config: dict) -> ModelSpec:
    cfg = check_config(config)
    c, size = cfg["in_channels"], cfg["input_size"]
    latent = c == 4                                              # SD-VAE latents, as in the paper
    return ModelSpec(
        sample_shape=(c, size, size),
        outputs=("eps", "var") if cfg["learn_sigma"] else ("eps",),
        prediction="epsilon",
        time={"convention": "discrete", "min": 0, "max": 999},
        # create_diffusion(): "linear" betas 1e-4..0.02 over 1000 steps.
        schedule={"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        num_classes=cfg["num_classes"],
        null_label=cfg["num_classes"] if cfg["class_dropout_prob"] > 0 else None,
        space="latent" if latent else "pixel",
        extra={"variance": "learned_range" if cfg["learn_sigma"] else "fixed_small",
               **({"latent_scale": 0.18215} if latent else {})},
    )


FAMILY = Family(name="dit", build=build, spec=spec, configs=CONFIGS, fixture="tiny",
                official=lambda m: m.model,
                description="DiT (facebookresearch/DiT): adaLN-Zero transformer, learned sigma")
