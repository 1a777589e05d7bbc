"""Independent plain transcription of DDM-Public's conditional U-Net (``unet/cond_unet.py``
``Unet`` at 8bf8ee2) and of its Swin backbone (``unet/swin_transformer.py``: torchvision's Swin
Transformer with ``first_coonv`` split out, the four stage outputs returned as NCHW), written
for the tests: it imports nothing from edgediff. It follows the official module layout and
operation order, so its ``state_dict`` keys are the official ones.

Also transcribed: the ``small`` condition encoder, edgediff's documented extension (not in
DDM-Public), so the fixture configuration can be checked the same way.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


# --- U-Net pieces (cond_unet.py) --------------------------------------------------------------
class WeightStandardizedConv2d(nn.Conv2d):
    def forward(self, x):
        eps = 1e-5
        o = self.weight.shape[0]
        flat = self.weight.reshape(o, -1)
        mean = flat.mean(-1).reshape(o, 1, 1, 1)
        var = flat.var(-1, unbiased=False).reshape(o, 1, 1, 1)
        w = (self.weight - mean) * (var + eps).rsqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) * (var + 1e-5).rsqrt() * self.g


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim)

    def forward(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class Block(nn.Module):
    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            x = x * (scale_shift[0] + 1) + scale_shift[1]
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim, dim_out, time_emb_dim, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, temb):
        ss = self.mlp(temb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return self.block2(self.block1(x, ss)) + self.res_conv(x)


class LinearAttention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(heads * dim_head, dim, 1), LayerNorm(dim))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = [t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1)]
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        ctx = k @ v.transpose(-1, -2)                        # b h d e
        out = ctx.transpose(-1, -2) @ q                      # b h e n
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = [t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1)]
        attn = ((q * self.scale).transpose(-1, -2) @ k).softmax(dim=-1)     # b h i j
        out = attn @ v.transpose(-1, -2)                                    # b h i d
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class SpatialAtt(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.map = nn.Conv2d(in_dim, 1, 1)
        self.q_conv = nn.Conv2d(1, 1, 1)
        self.k_conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        a = self.map(x)
        q = self.q_conv(a).flatten(2).transpose(1, 2)
        k = self.k_conv(a).flatten(2)
        a = F.softmax(q @ k, dim=-1) @ a.flatten(2).transpose(1, 2)
        return F.softsign(a.reshape(b, 1, h, w)) * x


class GaussianFourierProjection(nn.Module):
    def __init__(self, embedding_size, scale):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x):
        p = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(p), torch.cos(p)], dim=-1)


def sine_pos(x):
    """x: b, h, w, d -> the DETR sine code (b, h, w, d), unnormalised."""
    b, h, w, d = x.shape
    npf = d // 2
    not_mask = torch.ones(b, h, w)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    dim_t = torch.arange(npf, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / npf)
    px, py = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class BasicAttetnionLayer(nn.Module):
    def __init__(self, embed_dim, nhead, ffn_dim, window_size1, window_size2):
        super().__init__()
        self.ws1, self.ws2, self.nhead = window_size1, window_size2, nhead
        self.q_lin = nn.Linear(embed_dim, embed_dim)
        self.k_lin = nn.Linear(embed_dim, embed_dim)
        self.v_lin = nn.Linear(embed_dim, embed_dim)
        self.mlp = Mlp(embed_dim, ffn_dim)
        self.concat_conv = nn.Conv2d(2 * embed_dim, embed_dim, 1)
        self.gn = nn.GroupNorm(8, embed_dim)
        self.out_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def forward(self, x1, x2):
        B, C, H1, W1 = x1.shape
        H2, W2 = x2.shape[-2:]
        shortcut = self.gn(x2 + self.concat_conv(torch.cat(
            [F.interpolate(x1, size=(H2, W2), mode="bilinear", align_corners=True), x2], dim=1)))
        x1 = F.pad(x1, (0, (self.ws1[1] - W1 % self.ws1[1]) % self.ws1[1], 0, (self.ws1[0] - H1 % self.ws1[0]) % self.ws1[0]))
        x2 = F.pad(x2, (0, (self.ws2[1] - W2 % self.ws2[1]) % self.ws2[1], 0, (self.ws2[0] - H2 % self.ws2[0]) % self.ws2[0]))
        x1_s = F.avg_pool2d(x1, self.ws1)
        hq, wq = x1_s.shape[-2:]
        qg = x1_s.permute(0, 2, 3, 1)
        qg = (qg + sine_pos(qg)).reshape(B, -1, C)
        kg = F.avg_pool2d(x2, self.ws2).permute(0, 2, 3, 1)
        kg = (kg + sine_pos(kg)).reshape(B, -1, C)

        def heads(t):
            return t.reshape(B, t.shape[1], self.nhead, C // self.nhead).permute(0, 2, 1, 3)
        q, k, v = heads(self.q_lin(qg)), heads(self.k_lin(kg)), heads(self.v_lin(kg))
        out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
        x1_s = x1_s + out.transpose(1, 2).reshape(B, C, hq, wq)
        x1_s = x1_s + self.mlp(x1_s)
        return shortcut + self.out_conv(F.interpolate(x1_s, size=(H2, W2), mode="bilinear", align_corners=True))


class RelationNet(nn.Module):
    def __init__(self, in_channel1, in_channel2, embed_dim, window_size1, window_size2):
        super().__init__()
        self.input_conv1 = nn.Sequential(nn.Conv2d(in_channel1, embed_dim, 1), nn.BatchNorm2d(embed_dim, eps=0.001))
        self.input_conv2 = nn.Sequential(nn.Conv2d(in_channel2, embed_dim, 1), nn.BatchNorm2d(embed_dim, eps=0.001))
        self.attentions = nn.ModuleList([BasicAttetnionLayer(embed_dim, 8, embed_dim * 2, window_size1, window_size2)])

    def forward(self, cond, feat):
        cond, feat = self.input_conv1(cond), self.input_conv2(feat)
        for a in self.attentions:
            feat = a(cond, feat)
        return feat


# --- Swin (torchvision's, as DDM-Public copies it) ----------------------------------------------
class SwinAttention(nn.Module):
    def __init__(self, dim, window, shift, heads):
        super().__init__()
        self.window, self.shift, self.heads = window, shift, heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads) * 0.02)
        idx = torch.zeros(window[0] * window[1], window[0] * window[1], dtype=torch.long)
        cells = [(i, j) for i in range(window[0]) for j in range(window[1])]
        for a, (ia, ja) in enumerate(cells):
            for b, (ib, jb) in enumerate(cells):
                idx[a, b] = (ia - ib + window[0] - 1) * (2 * window[1] - 1) + (ja - jb + window[1] - 1)
        self.register_buffer("relative_position_index", idx.flatten())

    def forward(self, x):
        B, H, W, C = x.shape
        wh, ww = self.window
        x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        _, pH, pW, _ = x.shape
        sh = 0 if wh >= pH else self.shift[0]
        sw = 0 if ww >= pW else self.shift[1]
        if sh + sw > 0:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nW = (pH // wh) * (pW // ww)
        x = x.view(B, pH // wh, wh, pW // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nW, wh * ww, C)
        N = wh * ww
        qkv = self.qkv(x).reshape(B * nW, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (C // self.heads) ** -0.5, qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index].view(N, N, -1).permute(2, 0, 1)
        attn = q @ k.transpose(-2, -1) + bias.unsqueeze(0)
        if sh + sw > 0:
            lab = torch.zeros(pH, pW)
            n = 0
            for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
                for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
                    lab[hs, ws] = n
                    n += 1
            lab = lab.view(pH // wh, wh, pW // ww, ww).permute(0, 2, 1, 3).reshape(nW, N)
            mask = lab.unsqueeze(1) - lab.unsqueeze(2)
            mask = torch.where(mask != 0, torch.tensor(-100.0), torch.tensor(0.0))
            attn = (attn.view(B, nW, self.heads, N, N) + mask[None, :, None]).view(-1, self.heads, N, N)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B * nW, N, C)
        x = self.proj(x)
        x = x.view(B, pH // wh, pW // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, C)
        if sh + sw > 0:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :H, :W, :]


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinAttention(dim, window, shift, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class ToNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class SwinTransformer(nn.Module):
    def __init__(self, in_chans=3, depths=(2, 2, 18, 2)):
        super().__init__()
        self.first_coonv = nn.Sequential(nn.Conv2d(in_chans, 128, 4, 4), ToNHWC(), nn.LayerNorm(128))
        feats = []
        for i, (d, h) in enumerate(zip(depths, (4, 8, 16, 32))):
            dim = 128 * 2 ** i
            feats.append(nn.Sequential(*[SwinTransformerBlock(dim, h, [7, 7], [0, 0] if j % 2 == 0 else [3, 3])
                                         for j in range(d)]))
            if i < 3:
                feats.append(PatchMerging(dim))
        self.features = nn.ModuleList(feats)
        self.norm = nn.LayerNorm(1024)
        self.head = nn.Linear(1024, 1000)

    def forward(self, x):
        out = []
        x = self.first_coonv(x)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (0, 2, 4, 6):
                out.append(x.permute(0, 3, 1, 2))
        return out


class SmallCond(nn.Module):
    """edgediff's ``small`` encoder as documented: stem (conv stride s, GN, SiLU, conv, GN,
    SiLU) then three levels (stride-2 conv doubling width, GN, SiLU, conv, GN, SiLU)."""

    def __init__(self, cin, f, stride):
        super().__init__()

        def cgs(a, b, s):
            return [nn.Conv2d(a, b, 3, s, 1), nn.GroupNorm(min(8, b // 4), b), nn.SiLU()]
        self.stem = nn.Sequential(*cgs(cin, f, stride), *cgs(f, f, 1))
        self.levels = nn.ModuleList([nn.Sequential(*cgs(f * 2 ** i, f * 2 ** (i + 1), 2),
                                                   *cgs(f * 2 ** (i + 1), f * 2 ** (i + 1), 1)) for i in range(3)])

    def forward(self, x):
        out = [self.stem(x)]
        for lv in self.levels:
            out.append(lv(out[-1]))
        return out


# --- the U-Net ----------------------------------------------------------------------------------
class Unet(nn.Module):
    def __init__(self, dim, dim_mults=(1, 2, 4, 8), channels=1, window_sizes1=None, window_sizes2=None,
                 fourier_scale=16, cond_net="swin", single_channel_cond=False, swin_depths=(2, 2, 18, 2),
                 cond_in_dim=1, small_width=32, small_stride=1):
        super().__init__()
        if cond_net == "swin":
            self.init_conv_mask, f = SwinTransformer(1 if single_channel_cond else 3, swin_depths), 128
        else:
            self.init_conv_mask, f = SmallCond(cond_in_dim, small_width, small_stride), small_width
        self.init_conv = nn.Sequential(nn.Conv2d(channels + f, dim, 7, padding=3), nn.GroupNorm(min(dim // 4, 8), dim))
        dims = [dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.projects = nn.ModuleList([nn.Conv2d(f * 2 ** i, dims[i], 1) for i in range(4)])
        tdim = dim * 4
        self.time_mlp = nn.Sequential(GaussianFourierProjection(dim // 2, fourier_scale), nn.Linear(dim, tdim),
                                      nn.GELU(), nn.Linear(tdim, tdim))
        self.downs, self.relation_layers_down = nn.ModuleList(), nn.ModuleList()
        for i, (a, b) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([ResnetBlock(a, a, tdim), ResnetBlock(a, a, tdim),
                                             Residual(PreNorm(a, LinearAttention(a))),
                                             nn.Conv2d(a, b, 3, padding=1) if last else nn.Conv2d(a, b, 4, 2, 1)]))
            self.relation_layers_down.append(RelationNet(dims[i], dims[i], dims[i], window_sizes1[i], window_sizes2[i]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, tdim)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid)))
        self.mid_block2 = ResnetBlock(mid, mid, tdim)
        self.decouple1 = nn.Sequential(nn.GroupNorm(min(mid // 4, 8), mid), nn.Conv2d(mid, mid, 3, padding=1), SpatialAtt(mid))
        self.decouple2 = nn.Sequential(nn.GroupNorm(min(mid // 4, 8), mid), nn.Conv2d(mid, mid, 3, padding=1), SpatialAtt(mid))
        rev = dims[::-1]
        for suffix in ("", "2"):
            ups, rels = nn.ModuleList(), nn.ModuleList()
            for i, (a, b) in enumerate(reversed(in_out)):
                last = i == len(in_out) - 1
                up = nn.Conv2d(b, a, 3, padding=1) if last else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                                              nn.Conv2d(b, a, 3, padding=1))
                ups.append(nn.ModuleList([ResnetBlock(b + a, b, tdim), ResnetBlock(b + a, b, tdim),
                                          Residual(PreNorm(b, LinearAttention(b))), up]))
                rels.append(RelationNet(rev[i + 1], rev[i], rev[i], window_sizes1[::-1][i], window_sizes2[::-1][i]))
            setattr(self, "ups" + suffix, ups)
            setattr(self, "relation_layers_up" + suffix, rels)
        self.final_res_block = ResnetBlock(dim * 2, dim, tdim)
        self.final_conv = nn.Conv2d(dim, channels, 1)
        self.final_res_block2 = ResnetBlock(dim * 2, dim, tdim)
        self.final_conv2 = nn.Conv2d(dim, channels, 1)

    def forward(self, x, time, mask):
        t = time.reshape(-1, 1, 1, 1)
        x_in = x
        hm = self.init_conv_mask(mask)
        x = self.init_conv(torch.cat([x, F.interpolate(hm[0], size=x.shape[-2:], mode="bilinear")], dim=1))
        r = x.clone()
        temb = self.time_mlp(time.log())
        hm = [p(h) for p, h in zip(self.projects, hm)]
        hm2 = list(hm)
        h = []
        for i, ((b1, b2, attn, down), rel) in enumerate(zip(self.downs, self.relation_layers_down)):
            x = b1(x, temb)
            h.append(x)
            x = attn(b2(rel(hm[i], x), temb))
            h.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)
        outs = []
        for start, ups, rels, feats, final, conv in (
                (x + self.decouple1(x), self.ups, self.relation_layers_up, hm, self.final_res_block, self.final_conv),
                (x + self.decouple2(x), self.ups2, self.relation_layers_up2, hm2, self.final_res_block2, self.final_conv2)):
            y, skips, feats = start, list(h), list(feats)
            for (b1, b2, attn, up), rel in zip(ups, rels):
                y = b1(torch.cat((y, skips.pop()), dim=1), temb)
                y = rel(feats.pop(), y)
                y = b2(torch.cat((y, skips.pop()), dim=1), temb)
                y = up(attn(y))
            outs.append(conv(final(torch.cat((y, r), dim=1), temb)))
        c = (-1 + t) * x_in + t / (t + 1).sqrt() * outs[0]
        eps = t.sqrt() * x_in + (1 - t).sqrt() / (1 + t).sqrt() * outs[1]
        return c, eps
