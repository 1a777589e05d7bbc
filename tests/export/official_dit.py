"""An independent, deliberately plain DiT forward used as the parity reference in the tests.

Source: facebookresearch/DiT, file ``models.py`` at commit
ed81ce2229091fd4ecc9a223645f95cf379d582b (the ``DiT`` class with timm's ``PatchEmbed``,
``Attention`` and ``Mlp``, ``initialize_weights`` and ``get_2d_sincos_pos_embed``). Written
anew from that file's numerics (the upstream licence is non-commercial, so nothing is copied);
it shares no code with ``edgediff.export.models`` on purpose: a bug there cannot hide here.

Checked once, outside the test suite (upstream needs timm), against the real upstream file with
timm 1.0.31's layers, official init then ``perturb_``, t in {0, 500, 999}, class and null labels:
worst rel-L2 1.3e-7 (SDPA attention) and 1.2e-7 (timm's explicit attention path).

Only the module tree mirrors upstream, so that the state-dict keys are the checkpoint keys
(``x_embedder.proj``, ``t_embedder.mlp.0``, ``y_embedder.embedding_table``,
``blocks.N.attn.qkv``, ``blocks.N.adaLN_modulation.1``, ``final_layer.linear`` ...); all of the
computation is the single function ``OfficialDiT.forward`` below, written with torch.nn.functional.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _node(**children: nn.Module) -> nn.Module:
    """A parameter holder: an empty module with the given named children."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """Upstream's fixed 2-D position table, (grid*grid, dim), float64.

    Token k sits at row k // grid, column k % grid. The first dim/2 features encode the COLUMN
    (upstream builds its mesh with w first), the second dim/2 the ROW; each half is
    [sin(pos * w_i) | cos(pos * w_i)] with w_i = 10000^(-i / (dim/4)), i < dim/4.
    """
    assert dim % 4 == 0
    quarter = dim // 4
    w = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    row, col = np.divmod(np.arange(grid * grid), grid)

    def code(pos):
        a = pos.astype(np.float64)[:, None] * w[None, :]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([code(col), code(row)], axis=1)


class OfficialDiT(nn.Module):
    """Upstream ``DiT(...)`` keyword arguments; ``forward(x, t, y)`` in eval mode (no label drop)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        d = hidden_size
        self.p, self.d, self.heads = patch_size, d, num_heads
        self.c_in = in_channels
        self.c_out = 2 * in_channels if learn_sigma else in_channels
        self.grid = input_size // patch_size
        self.x_embedder = _node(proj=nn.Conv2d(in_channels, d, patch_size, stride=patch_size))
        self.t_embedder = _node(mlp=nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d)))
        # one extra row, the null label, exactly when trained with label dropout
        self.y_embedder = _node(embedding_table=nn.Embedding(num_classes + (class_dropout_prob > 0), d))
        table = torch.from_numpy(sincos_table(d, self.grid)).float()[None]
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        hidden = int(d * mlp_ratio)
        self.blocks = nn.ModuleList(
            _node(attn=_node(qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d)),
                  mlp=_node(fc1=nn.Linear(d, hidden), fc2=nn.Linear(hidden, d)),
                  adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)))
            for _ in range(depth))
        self.final_layer = _node(linear=nn.Linear(d, patch_size * patch_size * self.c_out),
                                 adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d)))

    @torch.no_grad()
    def official_init_(self) -> "OfficialDiT":
        """Upstream ``initialize_weights``: Xavier-uniform linears (patch conv seen as a linear) with
        zero biases, N(0, 0.02) label table and timestep-MLP weights, and ZERO adaLN projections,
        final modulation and final linear, so that an untrained DiT outputs exactly 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for m in zeroed:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, d, heads, p = x.shape[0], self.d, self.heads, self.p
        dh = d // heads

        # image -> tokens: conv patchify, row-major over the grid, plus the fixed table
        tok = self.x_embedder.proj(x).reshape(n, d, -1).permute(0, 2, 1) + self.pos_embed   # (n, T, d)
        length = tok.shape[1]

        # conditioning vector: MLP(cos | sin of t * 10000^(-k/128), k < 128) + label row
        k = torch.arange(128, dtype=torch.float32)
        freq = torch.exp(k * (-math.log(10000.0) / 128))
        angle = t.float()[:, None] * freq[None, :]
        cond = self.t_embedder.mlp(torch.cat([angle.cos(), angle.sin()], dim=1))
        cond = cond + self.y_embedder.embedding_table(y)                                # (n, d)

        def norm_mod(h, shift, scale):   # LayerNorm without affine, eps 1e-6, then x*(1+scale)+shift
            return F.layer_norm(h, (d,), eps=1e-6) * (1.0 + scale[:, None, :]) + shift[:, None, :]

        for blk in self.blocks:
            m = blk.adaLN_modulation(cond)                                               # (n, 6d)
            shift_a, scale_a, gate_a = m[:, 0:d], m[:, d:2 * d], m[:, 2 * d:3 * d]
            shift_f, scale_f, gate_f = m[:, 3 * d:4 * d], m[:, 4 * d:5 * d], m[:, 5 * d:]

            h = norm_mod(tok, shift_a, scale_a)
            qkv = blk.attn.qkv(h).reshape(n, length, 3, heads, dh)   # features ordered (q|k|v, head, dh)
            q = qkv[:, :, 0].transpose(1, 2)                          # (n, heads, T, dh)
            kk = qkv[:, :, 1].transpose(1, 2)
            v = qkv[:, :, 2].transpose(1, 2)
            weights = torch.softmax(q @ kk.transpose(2, 3) / math.sqrt(dh), dim=-1)
            a = (weights @ v).transpose(1, 2).reshape(n, length, d)
            tok = tok + gate_a[:, None, :] * blk.attn.proj(a)

            h = norm_mod(tok, shift_f, scale_f)
            f = blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh"))
            tok = tok + gate_f[:, None, :] * f

        fin = self.final_layer
        m = fin.adaLN_modulation(cond)
        out = fin.linear(norm_mod(tok, m[:, :d], m[:, d:]))                              # (n, T, p*p*C)

        # tokens -> image: token (i, j) carries a (p, p, C) patch for rows i*p.., columns j*p..
        g, c = self.grid, self.c_out
        img = torch.empty(n, c, g * p, g * p, dtype=out.dtype)
        patches = out.reshape(n, g, g, p, p, c)
        for i in range(g):
            for j in range(g):
                img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = patches[:, i, j].permute(0, 3, 1, 2)
        return img
