"""Condition encoders of the conditional dual U-Net (``init_conv_mask`` in the checkpoints).

``SwinBackbone`` is DDM-Public's ``unet/swin_transformer.py``: torchvision's Swin Transformer
(Liu et al. 2021, arXiv 2103.14030) with its patch embedding split out as ``first_coonv``
(sic) and a forward returning the outputs of the four stages (``features[0, 2, 4, 6]``) as
NCHW maps at 1/4, 1/8, 1/16 and 1/32 of the condition image, 128·2^i channels for Swin-B.
Reimplemented here (torch only; torchvision is not a dependency) with torchvision's parameter
names, buffers and arithmetic; ``norm`` and ``head`` are unused by DDM but sit in every
checkpoint, so they are kept for strict loading. One deliberate difference: the official
window attention writes "no shift" into the block's own ``shift_size`` list the first time a
feature map is not larger than a window and keeps it for every later call; here the decision
is made per call (as current torchvision does). At a fixed condition size both agree.

``SmallEncoder`` is an **edgediff extension** (``cond_net: small``), not in DDM-Public: four
convolutional levels with f, 2f, 4f, 8f channels, the first at ``small_stride`` of the
condition image and each next one at half of that, so a 16x16 condition can drive a 16x16
sample (the stand-in for Swin-B on small images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=(7, 7))


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return x.permute(*self.dims)


def _relative_index(wh: int, ww: int) -> torch.Tensor:
    """For every (query, key) pair of a wh x ww window, the row of the bias table holding
    their relative offset: (dy + wh - 1) * (2 ww - 1) + (dx + ww - 1), flattened."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])                 # (2, wh*ww)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)   # (wh*ww, wh*ww, 2)
    return ((rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1).flatten()


class WindowAttention(nn.Module):
    """(Shifted) window multi-head self-attention with a learned relative position bias."""

    def __init__(self, dim: int, window, shift, heads: int):
        super().__init__()
        self.window, self.shift, self.heads = list(window), list(shift), heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        wh, ww = self.window
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn((2 * wh - 1) * (2 * ww - 1), heads))
        self.register_buffer("relative_position_index", _relative_index(wh, ww))

    def _bias(self) -> torch.Tensor:
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)         # (1, heads, n, n)

    def _mask(self, ph: int, pw: int, shift, x: torch.Tensor) -> torch.Tensor:
        """-100 between tokens of a shifted window that came from different image regions."""
        wh, ww = self.window
        region = x.new_zeros((ph, pw))
        count = 0
        for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
            for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                region[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        diff = region.unsqueeze(1) - region.unsqueeze(2)                 # (nW, n, n)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        wh, ww = self.window
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        _, ph, pw, _ = x.shape
        # no shift where one window covers the (padded) map; decided per call
        shift = [0 if wh >= ph else self.shift[0], 0 if ww >= pw else self.shift[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nw = (ph // wh) * (pw // ww)
        x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, wh * ww, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(x.size(0), x.size(1), 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q = q * (c // self.heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1)) + self._bias()              # (B*nW, heads, n, n)
        if sum(shift) > 0:
            attn = attn.view(b, nw, self.heads, x.size(1), x.size(1)) + self._mask(ph, pw, shift, x)[None, :, None]
            attn = attn.view(-1, self.heads, x.size(1), x.size(1))
        x = attn.softmax(dim=-1).matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(b, ph // wh, pw // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


class SwinBlock(nn.Module):
    """Pre-norm window attention and a 4x GELU MLP (``mlp.0``, ``mlp.3``), both residual;
    stochastic depth and dropout are training-only and omitted."""

    def __init__(self, dim: int, heads: int, window, shift):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, window, shift, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (order (0,0), (1,0), (0,1), (1,1)), normed, 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)

    def forward(self, x):
        h, w = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))                              # (B, H/2, W/2, 2C)


class SwinBackbone(nn.Module):
    """Swin-B by default (``depths`` may be shortened for tests: the widths stay Swin-B's)."""

    def __init__(self, in_channels: int = 3, embed_dim: int = 128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                 window=(7, 7), patch: int = 4, num_classes: int = 1000):
        super().__init__()
        self.first_coonv = nn.Sequential(nn.Conv2d(in_channels, embed_dim, patch, stride=patch),
                                         Permute([0, 2, 3, 1]), nn.LayerNorm(embed_dim, eps=1e-5))
        layers = []
        for stage, (depth, nh) in enumerate(zip(depths, heads)):
            dim = embed_dim * 2 ** stage
            layers.append(nn.Sequential(*(SwinBlock(dim, nh, window, [0 if i % 2 == 0 else s // 2 for s in window])
                                          for i in range(depth))))
            if stage < len(depths) - 1:
                layers.append(PatchMerging(dim))
        self.features = nn.ModuleList(layers)
        width = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(width, eps=1e-5)          # classification head: unused, in checkpoints
        self.head = nn.Linear(width, num_classes)
        self.widths = tuple(embed_dim * 2 ** i for i in range(len(depths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.first_coonv(x)                                          # (B, H/4, W/4, C)
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 0:                                               # after each stage
                feats.append(x.permute(0, 3, 1, 2).contiguous())         # (B, C_i, H_i, W_i)
        return feats


class SmallEncoder(nn.Module):
    """edgediff extension: conv-GroupNorm-SiLU stem at stride ``stride``, then three levels,
    each a stride-2 conv doubling the width and a 3x3 conv; outputs f, 2f, 4f, 8f channels."""

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()

        def unit(cin, cout, s):
            return [nn.Conv2d(cin, cout, 3, stride=s, padding=1), nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU()]
        self.stem = nn.Sequential(*unit(in_channels, width, stride), *unit(width, width, 1))
        self.levels = nn.ModuleList(nn.Sequential(*unit(width << i, width << (i + 1), 2),
                                                  *unit(width << (i + 1), width << (i + 1), 1)) for i in range(3))
        self.widths = tuple(width << i for i in range(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for level in self.levels:
            feats.append(level(feats[-1]))
        return feats


def feature_sizes(cond_net: str, cond_hw, stride: int = 1) -> list[tuple[int, int]]:
    """Spatial sizes of the four condition features for a condition image of ``cond_hw``:
    Swin: 1/4 (patches), then halvings rounded up (PatchMerging pads odd sizes); small:
    1/stride, then stride-2 convolutions (also rounded up)."""
    h, w = cond_hw
    if cond_net == "swin":
        h, w = h // 4, w // 4
    else:
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
    sizes = [(h, w)]
    for _ in range(3):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes
