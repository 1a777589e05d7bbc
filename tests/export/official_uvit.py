"""An independent, deliberately plain U-ViT forward used as the parity reference in the tests.

Source: baofff/U-ViT, file ``libs/uvit.py`` (with ``libs/timm.py`` for ``Mlp`` and
``trunc_normal_``) at commit ce551708dc9cde9818d2af7d84dfadfeb7bd9034. Written anew from
that file's numerics; it shares no code with ``edgediff.export.models`` on purpose.

Upstream's attention has three paths chosen at import time; with any PyTorch that has
``scaled_dot_product_attention`` it takes the 'flash' one, which always scales by
head_dim^-0.5 and ignores ``qk_scale``. This transcription does the same (every published
config leaves ``qk_scale`` at None, where all paths agree).

Checked once, outside the test suite (upstream needs einops), against the real upstream file
('flash' mode), official init then ``perturb_``, t in {0, 499.5, 999}, class and null labels:
worst rel-L2 1.3e-7.

The text-to-image variant follows ``libs/uvit_t2i.py`` at the same commit (``OfficialUViTT2I``):
no label, ``context_embed`` (Linear clip_dim -> embed_dim) applied to the (n, num_clip_token,
clip_dim) context, tokens ordered [time, context, patches], ``pos_embed`` over 1 + num_clip_token
+ patches. Checked the same way against the real upstream file (official init then perturb_, t in
{1, 500, 1000}, N(0, 1) contexts): worst rel-L2 5.1e-8 (the tiny_t2i config) and 1.3e-7 (conv=False).

Only the module tree mirrors upstream, so that the state-dict keys are the checkpoint keys
(``patch_embed.proj``, ``time_embed.0``, ``label_emb``, ``pos_embed``, ``in_blocks.N.attn.qkv``,
``mid_block``, ``out_blocks.N.skip_linear``, ``norm``, ``decoder_pred``, ``final_layer``); all of
the computation is ``OfficialUViT.forward`` below, written with torch.nn.functional.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _node(**children: nn.Module | None) -> nn.Module:
    holder = nn.Module()
    for name, child in children.items():
        if child is not None:
            holder.add_module(name, child)
    return holder


def _block(d: int, hidden: int, qkv_bias: bool, skip: bool) -> nn.Module:
    return _node(norm1=nn.LayerNorm(d),
                 attn=_node(qkv=nn.Linear(d, 3 * d, bias=qkv_bias), proj=nn.Linear(d, d)),
                 norm2=nn.LayerNorm(d),
                 mlp=_node(fc1=nn.Linear(d, hidden), fc2=nn.Linear(hidden, d)),
                 skip_linear=nn.Linear(2 * d, d) if skip else None)


class OfficialUViT(nn.Module):
    """Upstream ``UViT(...)`` keyword arguments (norm_layer LayerNorm, no checkpointing);
    ``forward(x, timesteps, y=None)``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=False, qk_scale=None, mlp_time_embed=False, num_classes=-1,
                 conv=True, skip=True, clip_dim=None, num_clip_token=None):
        super().__init__()
        d = embed_dim
        self.text = clip_dim is not None                        # the uvit_t2i layout
        self.d, self.p, self.c, self.heads = d, patch_size, in_chans, num_heads
        self.grid = img_size // patch_size
        self.conditional = num_classes > 0
        self.n_extra = 2 if self.conditional else 1            # [label,] time, then the patches
        if self.text:                                           # time, the text tokens, then the patches
            self.n_extra = 1 + num_clip_token
            self.context_embed = nn.Linear(clip_dim, d)
        self.patch_embed = _node(proj=nn.Conv2d(in_chans, d, patch_size, stride=patch_size))
        if mlp_time_embed:
            self.time_embed = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.has_time_mlp = mlp_time_embed
        if self.conditional:
            self.label_emb = nn.Embedding(num_classes, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_extra + self.grid ** 2, d))
        hidden = int(d * mlp_ratio)
        half = depth // 2
        self.in_blocks = nn.ModuleList(_block(d, hidden, qkv_bias, False) for _ in range(half))
        self.mid_block = _block(d, hidden, qkv_bias, False)
        self.out_blocks = nn.ModuleList(_block(d, hidden, qkv_bias, skip) for _ in range(half))
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, patch_size * patch_size * in_chans)
        if conv:
            self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1)
        self.has_conv = conv

    @torch.no_grad()
    def official_init_(self) -> "OfficialUViT":
        """Upstream init: truncated N(0, 0.02) in [-2, 2] for pos_embed and Linear weights, ZERO
        Linear biases, LayerNorm weight 1 / bias 0; convolutions and the label table keep
        PyTorch's defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        return self

    def _block(self, blk: nn.Module, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        d, heads = self.d, self.heads
        dh = d // heads
        n, length, _ = h.shape
        if hasattr(blk, "skip_linear"):
            h = blk.skip_linear(torch.cat([h, skip], dim=2))     # current features, then the skip
        a = F.layer_norm(h, (d,), blk.norm1.weight, blk.norm1.bias, 1e-5)
        qkv = blk.attn.qkv(a).reshape(n, length, 3, heads, dh)  # features ordered (q|k|v, head, dh)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(dh), dim=-1)
        h = h + blk.attn.proj((weights @ v).transpose(1, 2).reshape(n, length, d))
        f = F.layer_norm(h, (d,), blk.norm2.weight, blk.norm2.bias, 1e-5)
        return h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(f)))           # exact (erf) GELU

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        n, d, p, c, g = x.shape[0], self.d, self.p, self.c, self.grid
        patches = self.patch_embed.proj(x).reshape(n, d, g * g).permute(0, 2, 1)   # row-major grid

        # time token: [cos | sin](t * 10000^(-k/(d/2))), k < d/2 (odd d: one zero appended)
        half = d // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / half))
        angle = timesteps.float()[:, None] * freq[None, :]
        emb = torch.cat([angle.cos(), angle.sin()] + ([angle[:, :1] * 0] if d % 2 else []), dim=1)
        if self.has_time_mlp:
            emb = self.time_embed(emb)
        tokens = [emb[:, None, :], patches]
        if y is not None:
            tokens = [self.label_emb(y)[:, None, :]] + tokens
        if self.text:
            words = context @ self.context_embed.weight.t() + self.context_embed.bias   # (n, k, d)
            tokens = [tokens[0], words, tokens[1]]
        h = torch.cat(tokens, dim=1) + self.pos_embed

        kept = []
        for blk in self.in_blocks:
            h = self._block(blk, h, None)
            kept.append(h)
        h = self._block(self.mid_block, h, None)
        for blk in self.out_blocks:
            h = self._block(blk, h, kept.pop())                   # last in-block pairs with first out-block

        h = F.layer_norm(h, (d,), self.norm.weight, self.norm.bias, 1e-5)
        out = self.decoder_pred(h)[:, self.n_extra:]              # (n, g*g, p*p*c), features (p1, p2, c)

        img = torch.empty(n, c, g * p, g * p, dtype=out.dtype)
        cells = out.reshape(n, g * g, p, p, c)
        for idx in range(g * g):
            i, j = divmod(idx, g)
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = cells[:, idx].permute(0, 3, 1, 2)
        return self.final_layer(img) if self.has_conv else img


def OfficialUViTT2I(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                    qkv_bias=False, qk_scale=None, mlp_time_embed=False, clip_dim=768, num_clip_token=77,
                    conv=True, skip=True) -> OfficialUViT:
    """Upstream ``libs/uvit_t2i.py`` ``UViT(...)`` keyword arguments; ``forward(x, timesteps, context=...)``."""
    return OfficialUViT(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale,
                        mlp_time_embed, -1, conv, skip, clip_dim=clip_dim, num_clip_token=num_clip_token)
