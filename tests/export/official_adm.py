"""An independent, deliberately plain ADM forward used as the parity reference in the tests.

Source: openai/guided-diffusion at commit 22e0df8183507e13a7813f8d38d51b072ca1e67c, files
``guided_diffusion/unet.py`` (``UNetModel``, ``EncoderUNetModel``, ``AttentionPool2d``,
``ResBlock``, ``AttentionBlock``, ``QKVAttentionLegacy``, ``QKVAttention``, ``Upsample``,
``Downsample``) and
``guided_diffusion/nn.py`` (``GroupNorm32``, ``timestep_embedding``, ``zero_module``). Written
anew from those files' numerics; it shares no code with ``edgediff.export.models`` on purpose:
a bug there cannot hide here.

Checked once, outside the test suite, against the real upstream files (unet.py, nn.py,
fp16_util.py copied to /tmp with an empty ``logger`` stub), official init then ``perturb_``,
t in {0, 500, 999}, batch 3, on the two configs of test_adm.py, the ``tiny`` fixture and tiny
with conv_resample=False (average-pool / plain nearest resampling): worst rel-L2 0.0
(bit-identical, torch 2.x CPU) on all four. ``OfficialEncoder`` (the noisy-image classifier)
was checked the same way against upstream ``EncoderUNetModel`` on the four configs of
test_adm_classifier.py (pools attention, adaptive, spatial, spatial_v2): logits and the
autograd input gradient bit-identical (rel-L2 0.0).

Only the module tree mirrors upstream, so that the state-dict keys are the checkpoint keys
(``time_embed.0``, ``label_emb``, ``input_blocks.I.J.in_layers.2``, ``...emb_layers.1``,
``...out_layers.3``, ``...skip_connection``, ``...qkv``, ``...proj_out``, ``...op``, ``...conv``,
``out.2`` ...); the computation is the functions at the bottom, written with
torch.nn.functional.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _node(**children: nn.Module) -> nn.Module:
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


def _seq(*children: nn.Module) -> nn.Sequential:
    return nn.Sequential(*children)


def _zeroed(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        p.detach().zero_()
    return layer


def _norm(ch):
    return nn.GroupNorm(32, ch)


def _res(ch, emb, out, ssn, kind):
    blk = _node(in_layers=_seq(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1)),
                emb_layers=_seq(nn.SiLU(), nn.Linear(emb, 2 * out if ssn else out)),
                out_layers=_seq(_norm(out), nn.SiLU(), nn.Dropout(0.0), _zeroed(nn.Conv2d(out, out, 3, padding=1))))
    if out != ch:
        blk.add_module("skip_connection", nn.Conv2d(ch, out, 1))
    blk.kind, blk.ssn = kind, ssn          # kind: "res", "res_down", "res_up"
    return blk


def _attn(ch, heads, head_ch, new_order):
    blk = _node(norm=_norm(ch), qkv=nn.Conv1d(ch, 3 * ch, 1), proj_out=_zeroed(nn.Conv1d(ch, ch, 1)))
    blk.kind = "attn"
    blk.heads = heads if head_ch == -1 else ch // head_ch
    blk.new_order = new_order
    return blk


def _down(ch, conv):
    blk = _node(op=nn.Conv2d(ch, ch, 3, stride=2, padding=1)) if conv else _node()
    blk.kind, blk.use_conv = "down", conv
    return blk


def _up(ch, conv):
    blk = _node(conv=nn.Conv2d(ch, ch, 3, padding=1)) if conv else _node()
    blk.kind, blk.use_conv = "up", conv
    return blk


class OfficialADM(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        assert dims == 2
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.mc, self.num_classes = model_channels, num_classes
        E = 4 * model_channels
        self.time_embed = _seq(nn.Linear(model_channels, E), nn.SiLU(), nn.Linear(E, E))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, E)
        ssn = use_scale_shift_norm
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [_res(ch, E, int(mult * model_channels), ssn, "res")]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(_attn(ch, num_heads, num_head_channels, use_new_attention_order))
                self.input_blocks.append(_seq(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_seq(_res(ch, E, ch, ssn, "res_down") if resblock_updown
                                              else _down(ch, conv_resample)))
                chans.append(ch)
                ds *= 2
        self.middle_block = _seq(_res(ch, E, ch, ssn, "res"),
                                 _attn(ch, num_heads, num_head_channels, use_new_attention_order),
                                 _res(ch, E, ch, ssn, "res"))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                layers = [_res(ch + ich, E, int(model_channels * mult), ssn, "res")]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(_attn(ch, num_heads_upsample, num_head_channels, use_new_attention_order))
                if level and i == num_res_blocks:
                    layers.append(_res(ch, E, ch, ssn, "res_up") if resblock_updown else _up(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(_seq(*layers))
        self.out = _seq(_norm(ch), nn.SiLU(), _zeroed(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    def forward(self, x, timesteps, y=None):
        emb = _mlp(self.time_embed, _timestep_embedding(timesteps, self.mc))
        if self.num_classes is not None:
            emb = emb + self.label_emb.weight[y]
        hs, h = [], x
        for stage in self.input_blocks:
            h = _stage(stage, h, emb)
            hs.append(h)
        h = _stage(self.middle_block, h, emb)
        for stage in self.output_blocks:
            h = _stage(stage, torch.cat([h, hs.pop()], dim=1), emb)
        return _conv(self.out[2], F.silu(_gn(self.out[0], h)))


class OfficialEncoder(nn.Module):
    """EncoderUNetModel: UNetModel's input half and middle block, then a pooling head."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, pool="adaptive"):
        super().__init__()
        assert dims == 2
        self.mc, self.pool = model_channels, pool
        E = 4 * model_channels
        self.time_embed = _seq(nn.Linear(model_channels, E), nn.SiLU(), nn.Linear(E, E))
        ssn = use_scale_shift_norm
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        feature = ch
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [_res(ch, E, int(mult * model_channels), ssn, "res")]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(_attn(ch, num_heads, num_head_channels, use_new_attention_order))
                self.input_blocks.append(_seq(*layers))
                feature += ch
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_seq(_res(ch, E, ch, ssn, "res_down") if resblock_updown
                                              else _down(ch, conv_resample)))
                feature += ch
                ds *= 2
        self.middle_block = _seq(_res(ch, E, ch, ssn, "res"),
                                 _attn(ch, num_heads, num_head_channels, use_new_attention_order),
                                 _res(ch, E, ch, ssn, "res"))
        feature += ch
        if pool == "adaptive":
            self.out = _seq(_norm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                            _zeroed(nn.Conv2d(ch, out_channels, 1)), nn.Flatten())
        elif pool == "attention":
            assert num_head_channels != -1
            spatial = image_size // ds
            pool_node = _node(qkv_proj=nn.Conv1d(ch, 3 * ch, 1), c_proj=nn.Conv1d(ch, out_channels, 1))
            pool_node.positional_embedding = nn.Parameter(torch.randn(ch, spatial ** 2 + 1) / ch ** 0.5)
            pool_node.heads = ch // num_head_channels
            self.out = _seq(_norm(ch), nn.SiLU(), pool_node)
        elif pool == "spatial":
            self.out = _seq(nn.Linear(feature, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            assert pool == "spatial_v2"
            self.out = _seq(nn.Linear(feature, 2048), nn.GroupNorm(32, 2048), nn.SiLU(), nn.Linear(2048, out_channels))

    def forward(self, x, timesteps):
        emb = _mlp(self.time_embed, _timestep_embedding(timesteps, self.mc))
        means, h = [], x
        for stage in self.input_blocks:
            h = _stage(stage, h, emb)
            means.append(h.mean(dim=(2, 3)))
        h = _stage(self.middle_block, h, emb)
        means.append(h.mean(dim=(2, 3)))
        out = self.out
        if self.pool.startswith("spatial"):
            z = _lin(out[0], torch.cat(means, dim=-1))
            z = F.relu(z) if self.pool == "spatial" else F.silu(_gn(out[1], z))
            return _lin(out[-1], z)
        h = F.silu(_gn(out[0], h))
        if self.pool == "adaptive":
            return F.conv2d(h.mean(dim=(2, 3), keepdim=True), out[3].weight, out[3].bias).flatten(1)
        return _attention_pool(out[2], h)


# --- the computation ----------------------------------------------------------------------------

def _timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _lin(layer, x):
    return F.linear(x, layer.weight, layer.bias)


def _mlp(seq, x):
    return _lin(seq[2], F.silu(_lin(seq[0], x)))


def _gn(norm, x):
    return F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).type(x.dtype)


def _conv(layer, x):
    return F.conv2d(x, layer.weight, layer.bias, stride=layer.stride, padding=layer.padding)


def _resample(kind, x):
    return F.interpolate(x, scale_factor=2, mode="nearest") if kind == "up" else F.avg_pool2d(x, 2, 2)


def _stage(stage, h, emb):
    for layer in stage:
        kind = getattr(layer, "kind", "conv")
        if kind == "conv":
            h = _conv(layer, h)
        elif kind.startswith("res"):
            h = _resblock(layer, h, emb)
        elif kind == "attn":
            h = _attention(layer, h)
        elif kind == "down":
            h = _conv(layer.op, h) if layer.use_conv else _resample("down", h)
        else:  # up
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            if layer.use_conv:
                h = _conv(layer.conv, h)
    return h


def _resblock(blk, x, emb):
    inl, outl = blk.in_layers, blk.out_layers
    h = F.silu(_gn(inl[0], x))
    if blk.kind != "res":
        which = "up" if blk.kind == "res_up" else "down"
        h, x = _resample(which, h), _resample(which, x)
    h = _conv(inl[2], h)
    e = _lin(blk.emb_layers[1], F.silu(emb)).type(h.dtype)[..., None, None]
    if blk.ssn:
        scale, shift = torch.chunk(e, 2, dim=1)
        h = _gn(outl[0], h) * (1 + scale) + shift
    else:
        h = _gn(outl[0], h + e)
    h = _conv(outl[3], F.silu(h))              # dropout is the identity in eval
    skip = _conv(blk.skip_connection, x) if hasattr(blk, "skip_connection") else x
    return skip + h


def _attention(blk, x):
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(blk.norm, x), blk.qkv.weight, blk.qkv.bias)
    bs, width, length = qkv.shape
    H = blk.heads
    ch = width // (3 * H)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if blk.new_order:       # QKVAttention: split q/k/v, then heads
        q, k, v = qkv.chunk(3, dim=1)
        q = (q * scale).reshape(bs * H, ch, length)
        k = (k * scale).reshape(bs * H, ch, length)
        v = v.reshape(bs * H, ch, length)
    else:                   # QKVAttentionLegacy: split heads, then q/k/v
        q, k, v = qkv.reshape(bs * H, ch * 3, length).split(ch, dim=1)
        q, k = q * scale, k * scale
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k).float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)
    h = F.conv1d(a, blk.proj_out.weight, blk.proj_out.bias)
    return (x + h).reshape(b, c, hh, ww)


def _attention_pool(pool, x):
    """CLIP's attention pool: [mean, tokens] + positions, q/k/v-then-heads attention, token 0."""
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + pool.positional_embedding[None]
    qkv = F.conv1d(x, pool.qkv_proj.weight, pool.qkv_proj.bias)
    bs, width, length = qkv.shape
    H = pool.heads
    ch = width // (3 * H)
    scale = 1 / math.sqrt(math.sqrt(ch))
    q, k, v = qkv.chunk(3, dim=1)
    w = torch.einsum("bct,bcs->bts", (q * scale).reshape(bs * H, ch, length), (k * scale).reshape(bs * H, ch, length))
    w = torch.softmax(w.float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v.reshape(bs * H, ch, length)).reshape(bs, -1, length)
    return F.conv1d(a, pool.c_proj.weight, pool.c_proj.bias)[:, :, 0]
