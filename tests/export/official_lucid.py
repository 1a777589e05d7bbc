"""An independent, deliberately plain forward of lucidrains' ``Unet``, the parity reference.

Source: lucidrains/denoising-diffusion-pytorch at commit
faed4db28e724735323fa91c70aa9b28a6e1cbac, file
``denoising_diffusion_pytorch/denoising_diffusion_pytorch.py`` (``Unet`` and its blocks) and
``denoising_diffusion_pytorch/attend.py`` (``Attend``). Written anew from that file's numerics;
it shares no code with ``edgediff.export.models`` on purpose: a bug there cannot hide here.

Checked once, outside the test suite (the upstream module imports accelerate, torchvision,
ema_pytorch ...; its ``Unet`` part and ``attend.py`` were run alone with einops 0.8.2, torch
2.13.0 CPU), upstream init then ``perturb_``, 16x16 inputs, batch 3, t in {0, 17, 999}: worst
rel-L2 of this transcription vs upstream 4.2e-7 (linear attention, dim_mults (1, 2)),
5.6e-7 (full attention on two of three levels, per-level heads, init_dim 12, self_condition
with and without x_self_cond, learned_variance), 3.9e-7 (random_fourier_features, flash_attn
i.e. SDPA) and 4.5e-7 (learned_sinusoidal_cond, theta 100, full_attn=True everywhere).
``edgediff.export.models.lucid.Unet`` vs upstream in the same runs: 0 (bit-identical) except
3.8e-7 against SDPA; both loaded upstream's state dict with strict=True.

Only the module tree mirrors upstream, so that state-dict keys are the checkpoint keys; all of
the computation is in plain functions over that tree, written with torch.nn.functional and
torch.einsum.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

def _node(**children) -> nn.Module:
    holder = nn.Module()
    for name, child in children.items():
        if isinstance(child, nn.Parameter):
            holder.register_parameter(name, child)
        else:
            holder.add_module(name, child)
    return holder


def _norm(dim):
    return _node(g=nn.Parameter(torch.ones(1, dim, 1, 1)))


def _res(a, b, tdim):
    return _node(mlp=nn.Sequential(nn.Identity(), nn.Linear(tdim, 2 * b)),
                 block1=_node(proj=nn.Conv2d(a, b, 3, padding=1), norm=_norm(b)),
                 block2=_node(proj=nn.Conv2d(b, b, 3, padding=1), norm=_norm(b)),
                 res_conv=nn.Conv2d(a, b, 1) if a != b else nn.Identity())


def _attn(dim, heads, dh, full):
    hid = heads * dh
    if full:
        return _node(norm=_norm(dim), mem_kv=nn.Parameter(torch.randn(2, heads, 4, dh)),
                     to_qkv=nn.Conv2d(dim, 3 * hid, 1, bias=False), to_out=nn.Conv2d(hid, dim, 1))
    return _node(norm=_norm(dim), mem_kv=nn.Parameter(torch.randn(2, heads, dh, 4)),
                 to_qkv=nn.Conv2d(dim, 3 * hid, 1, bias=False),
                 to_out=nn.Sequential(nn.Conv2d(hid, dim, 1), _norm(dim)))


def rms(m, x):
    c = x.shape[1]
    return F.normalize(x, dim=1) * m.g * math.sqrt(c)


def resnet(m, x, temb):
    ss = m.mlp[1](F.silu(temb))
    scale, shift = ss[:, : ss.shape[1] // 2, None, None], ss[:, ss.shape[1] // 2:, None, None]
    h = rms(m.block1.norm, m.block1.proj(x))
    h = F.silu(h * (scale + 1) + shift)
    h = F.silu(rms(m.block2.norm, m.block2.proj(h)))
    return h + m.res_conv(x)


def linear_attention(m, x, heads):
    b, c, hh, ww = x.shape
    qkv = m.to_qkv(rms(m.norm, x))
    q, k, v = [t.reshape(b, heads, -1, hh * ww) for t in torch.split(qkv, qkv.shape[1] // 3, dim=1)]
    k = torch.cat([m.mem_kv[0].expand(b, -1, -1, -1), k], dim=3)
    v = torch.cat([m.mem_kv[1].expand(b, -1, -1, -1), v], dim=3)
    q = torch.softmax(q, dim=2) * (q.shape[2] ** -0.5)
    k = torch.softmax(k, dim=3)
    ctx = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", ctx, q).reshape(b, -1, hh, ww)
    return rms(m.to_out[1], m.to_out[0](out))


def full_attention(m, x, heads):
    b, c, hh, ww = x.shape
    qkv = m.to_qkv(rms(m.norm, x))
    q, k, v = [t.reshape(b, heads, -1, hh * ww).permute(0, 1, 3, 2)
               for t in torch.split(qkv, qkv.shape[1] // 3, dim=1)]
    k = torch.cat([m.mem_kv[0].expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([m.mem_kv[1].expand(b, -1, -1, -1), v], dim=2)
    sim = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
    return m.to_out(out.permute(0, 1, 3, 2).reshape(b, -1, hh, ww))


class OfficialUnet(nn.Module):
    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3,
                 self_condition=False, learned_variance=False, learned_sinusoidal_cond=False,
                 random_fourier_features=False, learned_sinusoidal_dim=16, sinusoidal_pos_emb_theta=10000,
                 dropout=0.0, attn_dim_head=32, attn_heads=4, full_attn=None, flash_attn=False):
        super().__init__()
        n = len(dim_mults)
        self.dim, self.theta, self.self_condition = dim, sinusoidal_pos_emb_theta, self_condition
        d0 = init_dim if init_dim is not None else dim
        self.init_conv = nn.Conv2d(channels * (2 if self_condition else 1), d0, 7, padding=3)
        self.fourier = learned_sinusoidal_cond or random_fourier_features
        tdim = 4 * dim
        if self.fourier:
            first = _node(weights=nn.Parameter(torch.randn(learned_sinusoidal_dim // 2)))
            fdim = learned_sinusoidal_dim + 1
        else:
            first, fdim = nn.Identity(), dim
        self.time_mlp = nn.Sequential(first, nn.Linear(fdim, tdim), nn.GELU(), nn.Linear(tdim, tdim))
        tup = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
        self.full = tup(full_attn) if full_attn else [False] * (n - 1) + [True]
        self.heads, dhs = tup(attn_heads), tup(attn_dim_head)
        ws = [d0] + [dim * m for m in dim_mults]
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in range(n):
            a, b = ws[i], ws[i + 1]
            last = nn.Conv2d(a, b, 3, padding=1) if i == n - 1 else \
                nn.Sequential(nn.Identity(), nn.Conv2d(4 * a, b, 1))
            self.downs.append(nn.ModuleList([_res(a, a, tdim), _res(a, a, tdim),
                                             _attn(a, self.heads[i], dhs[i], self.full[i]), last]))
        self.mid_block1 = _res(ws[-1], ws[-1], tdim)
        self.mid_attn = _attn(ws[-1], self.heads[-1], dhs[-1], True)
        self.mid_block2 = _res(ws[-1], ws[-1], tdim)
        for i in reversed(range(n)):
            a, b = ws[i], ws[i + 1]
            last = nn.Conv2d(b, a, 3, padding=1) if i == 0 else \
                nn.Sequential(nn.Identity(), nn.Conv2d(b, a, 3, padding=1))
            self.ups.append(nn.ModuleList([_res(a + b, b, tdim), _res(a + b, b, tdim),
                                           _attn(b, self.heads[i], dhs[i], self.full[i]), last]))
        self.final_res_block = _res(2 * d0, d0, tdim)
        self.final_conv = nn.Conv2d(d0, out_dim or channels * (2 if learned_variance else 1), 1)

    def time_features(self, t):
        if self.fourier:
            w = self.time_mlp[0].weights
            f = t[:, None] * w[None] * 2 * math.pi
            return torch.cat([t[:, None], torch.sin(f), torch.cos(f)], dim=1)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(self.theta) / (half - 1)))
        a = t[:, None] * freqs[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    def attend(self, m, x, level, full):
        return (full_attention if full else linear_attention)(m, x, self.heads[level])

    def forward(self, x, t, x_self_cond=None):
        if self.self_condition:
            x = torch.cat([torch.zeros_like(x) if x_self_cond is None else x_self_cond, x], dim=1)
        x = self.init_conv(x)
        r = x
        e = self.time_features(t)
        e = self.time_mlp[3](F.gelu(self.time_mlp[1](e)))
        n = len(self.downs)
        hs = []
        for i, (b1, b2, at, dn) in enumerate(self.downs):
            x = resnet(b1, x, e)
            hs.append(x)
            x = resnet(b2, x, e)
            x = x + self.attend(at, x, i, self.full[i])
            hs.append(x)
            if i < n - 1:
                x = F.pixel_unshuffle(x, 2)          # (c, p1, p2) channel order, as the Rearrange
                x = dn[1](x)
            else:
                x = dn(x)
        x = resnet(self.mid_block1, x, e)
        x = x + full_attention(self.mid_attn, x, self.heads[-1])
        x = resnet(self.mid_block2, x, e)
        for j, (b1, b2, at, up) in enumerate(self.ups):
            i = n - 1 - j
            x = resnet(b1, torch.cat([x, hs.pop()], 1), e)
            x = resnet(b2, torch.cat([x, hs.pop()], 1), e)
            x = x + self.attend(at, x, i, self.full[i])
            x = up(x) if i == 0 else up[1](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = resnet(self.final_res_block, torch.cat([x, r], 1), e)
        return self.final_conv(x)
