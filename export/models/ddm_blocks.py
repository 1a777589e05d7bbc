"""Layers of the decoupled diffusion model's U-Net (DDM, arXiv 2306.13720).

DDM's official ``unet/uncond_unet.py`` builds on the EDM code base's ADM ("Dhariwal") U-Net.
These layers reproduce that code's parameter names, buffer names and arithmetic (the order
of operations included) so that official checkpoints load strictly and the outputs agree to
float32 rounding. Only the options the ADM U-Net uses are implemented: adaptive scale/shift,
skip scale 1, [1, 1] resampling without fusion, 64 channels per attention head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _random(shape: list[int], fan_in: int) -> torch.Tensor:
    # Checkpoints overwrite every weight; a non-zero start keeps fixtures and tests meaningful
    # (the official zero-initialised output layers would hide half of the network).
    return torch.randn(*shape) / math.sqrt(max(fan_in, 1))


class Linear(nn.Module):
    """Fully connected layer stored as the EDM code stores it: ``weight`` (out, in), ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(_random([out_features, in_features], in_features))
        self.bias = nn.Parameter(0.1 * torch.randn(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # matmul then a separate add, as the official layer does (addmm rounds differently)
        x = x @ self.weight.t()
        if self.bias is not None:
            x = x + self.bias
        return x


class Conv2d(nn.Module):
    """Square convolution with optional 2x nearest upsampling or 2x2 mean downsampling.

    ``kernel=0`` means resampling only (no weight). The resampling filter is a buffer named
    ``resample_filter`` (in the checkpoints) holding outer([1, 1]) / 4, applied depthwise
    before the convolution: a transposed convolution with 4x the filter upsamples, a
    stride-2 convolution with it downsamples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(_random([out_channels, in_channels, kernel, kernel], fan_in)) if kernel else None
        self.bias = nn.Parameter(0.1 * torch.randn(out_channels)) if kernel and bias else None
        taps = torch.tensor([1.0, 1.0])
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()    # (1, 1, 2, 2)
        self.register_buffer("resample_filter", filt if up or down else None)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter
        pad = (f.shape[-1] - 1) // 2
        c = self.in_channels
        if self.up:
            # (N, C, H, W) -> (N, C, 2H, 2W), each pixel copied into a 2x2 patch
            return F.conv_transpose2d(x, (4 * f).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)
        # (N, C, H, W) -> (N, C, H/2, W/2), mean of each 2x2 patch
        return F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            x = self._resample(x)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm with min(32, C // 4) groups and eps 1e-5 (the EDM ADM setting)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(num_channels))
        self.bias = nn.Parameter(0.1 * torch.randn(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos | sin] of a scalar per sample, frequencies 1e-4 ** (i / half).

    The frequencies are computed with the same float32 expression as the official module
    (a power, not exp/log), so they are bit-identical; they are not part of the checkpoint.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        half = num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32) / half
        self.register_buffer("freqs", (1 / max_positions) ** freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = torch.outer(x, self.freqs)                      # (N, half)
        return torch.cat([args.cos(), args.sin()], dim=1)      # (N, 2*half)


class UNetBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, adaptive GN scale/shift from the embedding, SiLU,
    conv, residual add; then optional multi-head self-attention (64 channels per head).

    Dropout sits before ``conv1`` in training; it is the identity at inference and omitted.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, channels_per_head: int = 64):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        # fewer than 64 channels means zero heads: the official block then has no attention
        self.num_heads = out_channels // channels_per_head if attention else 0

        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down)
        self.affine = Linear(emb_channels, out_channels * 2)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3)
        self.skip = None
        if out_channels != in_channels or up or down:
            # a 1x1 projection only where the channel count changes; resampling alone otherwise
            kernel = 1 if out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1)
            self.proj = Conv2d(out_channels, out_channels, kernel=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))                          # (N, Cout, H', W')
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)  # (N, Cout, 1, 1) each
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(x)
        x = x + (self.skip(orig) if self.skip is not None else orig)
        if self.num_heads:
            x = self._attend(x)
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        heads = self.num_heads
        # qkv channels are laid out per head as (C/heads, 3): index = head*3d + ch*3 + {q,k,v}
        q, k, v = self.qkv(self.norm2(x)).reshape(n * heads, c // heads, 3, h * w).unbind(2)
        scores = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c // heads))   # (N*heads, HW, HW)
        a = torch.einsum("nqk,nck->ncq", scores.softmax(dim=2), v)           # (N*heads, d, HW)
        return self.proj(a.reshape(n, c, h, w)) + x


class SpatialAttention(nn.Module):
    """DDM's spatial gate (official ``SpatialAtt``): a one-channel map attends over all
    positions, and softsign of the result scales the input features."""

    def __init__(self, channels: int):
        super().__init__()
        self.map = nn.Conv2d(channels, 1, 1)
        self.q_conv = nn.Conv2d(1, 1, 1)
        self.k_conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        att = self.map(x)                                         # (N, 1, H, W)
        q = self.q_conv(att).reshape(n, 1, h * w).transpose(1, 2)  # (N, HW, 1)
        k = self.k_conv(att).reshape(n, 1, h * w)                  # (N, 1, HW)
        values = att.reshape(n, 1, h * w).transpose(1, 2)          # (N, HW, 1)
        att = F.softmax(q @ k, dim=-1) @ values                    # (N, HW, 1), no 1/sqrt(d)
        return F.softsign(att.reshape(n, 1, h, w)) * x


def decouple_head(channels: int) -> nn.Sequential:
    """3x3 conv then the spatial gate; the U-Net adds its input back (``x + head(x)``).
    A Sequential so that the checkpoint names are ``decoupleN.0.*`` and ``decoupleN.1.*``."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), SpatialAttention(channels))
