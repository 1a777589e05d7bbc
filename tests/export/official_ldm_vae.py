"""Reference for the LDM ("CompVis") layout of the first-stage KL autoencoder, for the tests.

An independent transcription, written from the source of CompVis/latent-diffusion at commit
a506df5756472e2ebaf9078affdde2c4f1502cd4: the layers of ``ldm/modules/diffusionmodules/model.py``
(Encoder, Decoder and their ResNet, attention and resampling blocks), plus ``encode``/``decode``
of ``AutoencoderKL`` in ``ldm/models/autoencoder.py`` and ``DiagonalGaussianDistribution.mode``
in ``ldm/modules/distributions/distributions.py``. It shares no code with edgediff, so the
checkpoint conversion in edgediff is tested against something it was not derived from.

Only the inference path the KL autoencoders use is covered: convolutional resampling, the
mid-block attention, no timestep embedding, dropout treated as identity (eval), no attention
inside the levels (a config asking for it is refused rather than silently ignored), no
``give_pre_end``/``tanh_out``. The arithmetic follows the source op for op and the submodule
attribute names are the official ones, so an official first-stage state dict loads with
``strict=True`` and the outputs match the official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels):
    # GroupNorm with 32 groups, eps 1e-6, learned scale and shift.
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x):
    # x * sigmoid(x), spelled out (F.silu need not round the same way).
    return x * torch.sigmoid(x)


def _conv(cin, cout, k=3, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=(k // 2 if stride == 1 else 0))


class ResBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, added to the input. When the channel
    count changes, the input goes through a 1x1 conv ``nin_shortcut`` first."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv(cin, cout)
        self.norm2, self.conv2 = _norm(cout), _conv(cout, cout)
        if cin != cout:
            self.nin_shortcut = _conv(cin, cout, k=1)

    def forward(self, x):
        y = self.conv1(_swish(self.norm1(x)))
        y = self.conv2(_swish(self.norm2(y)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + y


class SpatialSelfAttention(nn.Module):
    """One head over all H*W positions: 1x1 convs q, k, v from the normalised input, softmax of
    q.k * C^-0.5 over the keys, weighted sum of v, 1x1 ``proj_out``, added to the input."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (_conv(channels, channels, k=1) for _ in range(3))
        self.proj_out = _conv(channels, channels, k=1)

    def forward(self, x):
        n, c, height, width = x.shape
        t = self.norm(x)
        q = self.q(t).reshape(n, c, height * width).permute(0, 2, 1)      # n, hw, c
        k = self.k(t).reshape(n, c, height * width)                       # n, c, hw
        v = self.v(t).reshape(n, c, height * width)                       # n, c, hw
        weights = torch.bmm(q, k) * (c ** -0.5)                           # n, hw(query), hw(key)
        weights = torch.softmax(weights, dim=2)
        mixed = torch.bmm(v, weights.permute(0, 2, 1)).reshape(n, c, height, width)
        return x + self.proj_out(mixed)


class Halve(nn.Module):
    """Zero-pad one row at the bottom and one column at the right, (0, 1, 0, 1), then a 3x3
    stride-2 conv without padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = _conv(channels, channels, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Double(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ``block`` (a list of ResBlocks) then an optional resampler, stored as
    ``downsample`` or ``upsample`` as in the official keys."""

    def __init__(self, blocks, resample_name=None, resampler=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resampler is not None:
            setattr(self, resample_name, resampler)

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class Middle(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution (``block_1``, ``attn_1``, ``block_2``)."""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResBlock(channels, channels)
        self.attn_1 = SpatialSelfAttention(channels)
        self.block_2 = ResBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _refuse_level_attention(cfg):
    """The official code adds attention at level i when resolution // 2**i is in attn_resolutions;
    this reference does not implement that."""
    res, wanted = cfg.get("resolution"), cfg.get("attn_resolutions") or ()
    if isinstance(res, int) and any(res // 2 ** i in wanted for i in range(len(cfg["ch_mult"]))):
        raise NotImplementedError("attention inside the levels is not transcribed here")


class Encoder(nn.Module):
    """conv_in; per level i, num_res_blocks ResBlocks to ch*ch_mult[i] channels (the first one
    coming from ch*ch_mult[i-1], ch for level 0) and a Halve except at the last level; Middle;
    norm_out, swish, conv_out to 2*z_channels (mean and log-variance) or z_channels."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, in_channels, z_channels, double_z=True, **_unused):
        super().__init__()
        self.conv_in = _conv(in_channels, ch)
        widths = [ch * m for m in ch_mult]
        levels, cur = [], ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cur, width))
                cur = width
            last = i == len(widths) - 1
            levels.append(Level(blocks, None if last else "downsample", None if last else Halve(cur)))
        self.down = nn.ModuleList(levels)
        self.mid = Middle(cur)
        self.norm_out = _norm(cur)
        self.conv_out = _conv(cur, 2 * z_channels if double_z else z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(_swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """conv_in from z_channels to ch*ch_mult[-1]; Middle; then the levels from the last (lowest
    resolution) back to level 0, each with num_res_blocks + 1 ResBlocks to ch*ch_mult[i] and a
    Double except at level 0; norm_out, swish, conv_out to out_ch. ``up[i]`` is level i, so
    ``up`` is indexed in encoder order but run in reverse."""

    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, z_channels, **_unused):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        cur = widths[-1]
        self.conv_in = _conv(z_channels, cur)
        self.mid = Middle(cur)
        levels = {}
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(cur, widths[i]))
                cur = widths[i]
            levels[i] = Level(blocks, "upsample" if i else None, Double(cur) if i else None)
        self.up = nn.ModuleList(levels[i] for i in range(len(widths)))
        self.norm_out = _norm(cur)
        self.conv_out = _conv(cur, out_ch)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The first-stage KL autoencoder at inference: encoder + 1x1 ``quant_conv`` to 2*embed_dim
    moments, 1x1 ``post_quant_conv`` + decoder on the way back."""

    def __init__(self, ddconfig, embed_dim):
        super().__init__()
        _refuse_level_attention(ddconfig)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode_mode(self, x):
        """The posterior's mode, i.e. its mean: the first embed_dim channels of the moments."""
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : moments.shape[1] // 2]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))
