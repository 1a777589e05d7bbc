"""Layers of DDM's conditional dual U-Net (GuHuangAI/DDM-Public ``unet/cond_unet.py``).

Reimplemented from the upstream design, with its parameter names so that official
checkpoints load strictly: ResNet blocks of weight-standardised convolutions with a
time scale/shift, channel layer norm with a gain ``g``, linear and full attention behind a
pre-norm residual, a Gaussian Fourier time encoder, and the **relation layer**: a windowed
cross-attention in which average-pooled condition features (queries) attend to pooled input
features (keys, values), both with a fixed 2-D sine position code, merged back at full size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WSConv2d(nn.Conv2d):
    """Convolution whose kernel is standardised per output channel (zero mean, unit variance
    over in-channels and taps, eps 1e-5 in float32) before use."""

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return F.conv2d(x, (w - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding)


class Block(nn.Module):
    """WS-conv 3x3 -> GroupNorm -> optional (scale + 1, shift) -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.proj = WSConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks, the first modulated by the time embedding; 1x1 skip where widths differ."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int, groups: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, emb):
        scale_shift = self.mlp(emb)[:, :, None, None].chunk(2, dim=1)     # 2 x (N, Cout, 1, 1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class ChannelNorm(nn.Module):
    """Layer norm over channels with a gain ``g`` (1, C, 1, 1) and no bias (upstream ``LayerNorm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class PreNormResidual(nn.Module):
    """x + fn(norm(x)), nested as upstream's Residual(PreNorm(...)): keys ``fn.fn.*``, ``fn.norm.g``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = nn.Module()
        self.fn.fn = fn
        self.fn.norm = ChannelNorm(dim)

    def forward(self, x):
        return self.fn.fn(self.fn.norm(x)) + x


def _heads_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, c, h, w = t.shape
    return t.reshape(n, heads, c // heads, h * w)                 # (N, heads, d, HW)


class LinearAttention(nn.Module):
    """Softmax of q over features and of k over positions; context = k v^T, out = context^T q."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChannelNorm(dim))

    def forward(self, x):
        n, _, h, w = x.shape
        q, k, v = (_heads_split(p, self.heads) for p in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)                # (N, heads, d, d)
        out = torch.einsum("bhde,bhdn->bhen", context, q)              # (N, heads, d, HW)
        return self.to_out(out.reshape(n, -1, h, w))


class Attention(nn.Module):
    """Multi-head softmax attention over all positions (the middle of the U-Net)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        q, k, v = (_heads_split(p, self.heads) for p in self.to_qkv(x).chunk(3, dim=1))
        sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)        # (N, heads, HW, HW)
        out = torch.einsum("bhij,bhdj->bhid", sim.softmax(dim=-1), v)  # (N, heads, HW, d)
        return self.to_out(out.permute(0, 1, 3, 2).reshape(n, -1, h, w))


class GaussianFourier(nn.Module):
    """[sin | cos](2 pi c W) with fixed random frequencies ``W`` (stored in the checkpoint)."""

    def __init__(self, size: int, scale: float):
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)

    def forward(self, c):
        proj = c[:, None] * self.W[None, :] * 2 * math.pi               # (N, size)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class RandomFourier(nn.Module):
    """[c | sin | cos](2 pi c w): the learned / random sinusoidal option (``weights``)."""

    def __init__(self, dim: int, is_random: bool):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2), requires_grad=not is_random)

    def forward(self, c):
        c = c[:, None]
        freqs = c * self.weights[None, :] * 2 * math.pi
        return torch.cat([c, freqs.sin(), freqs.cos()], dim=-1)


def upsample(dim: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


def downsample(dim: int, dim_out: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim_out, 4, 2, 1)


# --- the relation layer ---------------------------------------------------------------------

def sine_position(h: int, w: int, d: int, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D sine code (h, w, d) of DETR style, unnormalised: [rows | cols], each half
    interleaving sin (even index) and cos (odd index) of position / temperature^(2(k//2)/half)."""
    half = d // 2
    ones = torch.ones(1, h, w)
    rows = ones.cumsum(1, dtype=torch.float32)[0]                       # (h, w): 1..h
    cols = ones.cumsum(2, dtype=torch.float32)[0]                       # (h, w): 1..w
    k = torch.arange(half, dtype=torch.float32)
    dim_t = temperature ** (2 * (k // 2) / half)

    def code(pos):
        p = pos[:, :, None] / dim_t                                     # (h, w, half)
        return torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2)
    return torch.cat((code(rows), code(cols)), dim=2)                   # (h, w, d)


class Mlp(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv (dropout only in training)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _pad_to(x: torch.Tensor, window) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (window[1] - w % window[1]) % window[1], 0, (window[0] - h % window[0]) % window[0]))


class RelationAttention(nn.Module):
    """One relation layer (upstream ``BasicAttetnionLayer``): pooled condition windows attend
    to pooled feature windows (no 1/sqrt(d) scaling), an MLP refines them, and the result is
    upsampled onto a gated shortcut of the features."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, window1, window2):
        super().__init__()
        self.window1, self.window2, self.heads = list(window1), list(window2), heads
        self.q_lin, self.k_lin, self.v_lin = (nn.Linear(dim, dim) for _ in range(3))
        self.mlp = Mlp(dim, ffn_dim)
        self.concat_conv = nn.Conv2d(2 * dim, dim, 1)
        self.gn = nn.GroupNorm(8, dim)
        self.out_conv = nn.Conv2d(dim, dim, 1)

    def _tokens(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h*w, C) with the sine code added."""
        n, c, h, w = pooled.shape
        tokens = pooled.permute(0, 2, 3, 1) + sine_position(h, w, c).to(pooled)
        return tokens.reshape(n, h * w, c)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, length, c = t.shape
        return t.reshape(n, length, self.heads, c // self.heads).permute(0, 2, 1, 3)  # (N, heads, L, d)

    def forward(self, cond: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        n, c, h2, w2 = feat.shape
        up = dict(size=(h2, w2), mode="bilinear", align_corners=True)
        shortcut = self.gn(feat + self.concat_conv(torch.cat([F.interpolate(cond, **up), feat], dim=1)))
        pooled_q = F.avg_pool2d(_pad_to(cond, self.window1), self.window1)      # (N, C, hq, wq)
        pooled_k = F.avg_pool2d(_pad_to(feat, self.window2), self.window2)      # (N, C, hk, wk)
        q, kv = self._tokens(pooled_q), self._tokens(pooled_k)
        attn = (self._split(self.q_lin(q)) @ self._split(self.k_lin(kv)).transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ self._split(self.v_lin(kv))).transpose(1, 2).reshape(n, q.shape[1], c)  # (N, Lq, C)
        x = pooled_q + out.transpose(1, 2).reshape(pooled_q.shape)
        x = x + self.mlp(x)
        return shortcut + self.out_conv(F.interpolate(x, **up))


class RelationNet(nn.Module):
    """1x1 conv + BatchNorm (eps 1e-3, running statistics at inference) on both inputs, then
    one relation layer (upstream ``RelationNet`` with layers=1, 8 heads)."""

    def __init__(self, cond_dim: int, feat_dim: int, dim: int, window1, window2, heads: int = 8):
        super().__init__()
        self.input_conv1 = nn.Sequential(nn.Conv2d(cond_dim, dim, 1), nn.BatchNorm2d(dim, momentum=0.03, eps=0.001))
        self.input_conv2 = nn.Sequential(nn.Conv2d(feat_dim, dim, 1), nn.BatchNorm2d(dim, momentum=0.03, eps=0.001))
        self.attentions = nn.ModuleList([RelationAttention(dim, heads, dim * 2, window1, window2)])

    def forward(self, cond, feat):
        cond, feat = self.input_conv1(cond), self.input_conv2(feat)
        for layer in self.attentions:
            feat = layer(cond, feat)
        return feat


class LearnedPosition(nn.Module):
    """Upstream ``PositionEmbeddingLearned`` (row/column tables): built for ``cond_pe: true``
    so its checkpoint keys load, but the official forward never calls it."""

    def __init__(self, feature_size, num_pos_feats: int):
        super().__init__()
        self.row_embed = nn.Embedding(feature_size[0], num_pos_feats)
        self.col_embed = nn.Embedding(feature_size[1], num_pos_feats)
