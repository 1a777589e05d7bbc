"""Decoupled diffusion model (DDM, arXiv 2306.13720): the dual-decoder U-Net.

DDM writes the forward process as x_t = x_0 + C*t + sqrt(t)*eps with C = -x_0 and t in
(0, 1]; one shared ADM encoder feeds two decoders, one predicting C ("image to zero") and one
predicting eps ("zero to noise"). The official code (GuHuangAI/DDM-Public, later renamed
ADM-Public, ``unet/uncond_unet.py``; revision in ``PRECOND_SOURCE``) wraps that U-Net
(``DhariwalUNet``) in an EDM-style preconditioner (``EDMPrecond``). This module
reimplements both with the official state-dict layout:

    EDMPrecond (here ``DDMPrecond``)        keys ``model.*``
      model: DhariwalUNet (``DualDecoderUNet``)
        map_layer0/1, map_label, map_augment, enc.*, decouple1/2, dec.*, out_norm/out_conv,
        dec2.*, out_norm2/out_conv2

The official sampler calls ``model(x, t)`` with t itself (no remapping) and reads
``C, noise = pred[:2]``, so the exported graph takes t in (0, 1] and returns (c, eps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ddm_blocks import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, decouple_head
from .family import Family, ModelSpec
from .validation import Field, Schema, boolean, choice, fraction, nonneg_int, pos_float, pos_int, rule

OFFICIAL_CLASS = "unet.uncond_unet.EDMPrecond"

# The official DDM model-level settings (``model:`` in the yaml, outside the U-Net): training
# draws t ~ U(eps, 1); the official sampler walks N steps of 1/N from t = 1, the last split at eps.
_EPS = 1e-4
_SIGMA_MIN = 0.01
_SIGMA_MAX = 1.0
SAMPLING_STEPS = 10


class DualDecoderUNet(nn.Module):
    """The official ``DhariwalUNet`` of uncond_unet.py: ADM encoder, two decouple heads, two
    decoders with their own output layers. Returns (F_c, F_eps) before preconditioning."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult=(1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions=(32, 16, 8)):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        self.map_noise = PositionalEmbedding(model_channels)
        # augmentation labels exist only in training (exported graphs never feed them)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, emb_channels, down=True)
            for idx in range(num_blocks):
                # the first block of a level widens from the previous level's channels
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb_channels,
                                                                attention=res in attn_resolutions)
        skips = [block.out_channels for block in self.enc.values()]

        self.decouple1 = decouple_head(cout)
        self.decouple2 = decouple_head(cout)
        self.dec, width = self._decoder(img_resolution, model_channels, channel_mult, num_blocks,
                                        attn_resolutions, emb_channels, cout, list(skips))
        self.out_norm = GroupNorm(width)
        self.out_conv = Conv2d(width, out_channels, kernel=3)
        self.dec2, width = self._decoder(img_resolution, model_channels, channel_mult, num_blocks,
                                         attn_resolutions, emb_channels, cout, list(skips))
        self.out_norm2 = GroupNorm(width)
        self.out_conv2 = Conv2d(width, out_channels, kernel=3)

    @staticmethod
    def _decoder(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions,
                 emb_channels, cout, skips) -> tuple[nn.ModuleDict, int]:
        """One decoder (both are built alike); ``skips`` is consumed from the end."""
        dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, emb_channels, attention=True)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, emb_channels)
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, emb_channels, up=True)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb_channels,
                                                           attention=res in attn_resolutions)
        return dec, cout

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) log-time, optional (N|1, label_dim) one-hot labels and (N, augment_dim)
        augmentation labels -> (N, emb_channels)."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            # training only (the sampler passes none): added to the raw noise embedding
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            # labels enter after the second layer, unlike the noise level
            emb = emb + self.map_label(class_labels)
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        # both decoders read the same skips; each starts from its own decoupled features
        c = self._decode(self.dec, self.decouple1(x) + x, list(skips), emb)
        c = self.out_conv(F.silu(self.out_norm(c)))                   # (N, C, H, W)
        eps = self._decode(self.dec2, self.decouple2(x) + x, list(skips), emb)
        eps = self.out_conv2(F.silu(self.out_norm2(eps)))             # (N, C, H, W)
        return c, eps

    @staticmethod
    def _decode(dec: nn.ModuleDict, x: torch.Tensor, skips: list, emb: torch.Tensor) -> torch.Tensor:
        for block in dec.values():
            if x.shape[1] != block.in_channels:   # the _block entries take a skip, as upstream
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return x


# The upstream revision whose EDMPrecond coefficients DDMPrecond reproduces (recorded in
# the bundle: the same class name meant other coefficients in later upstream revisions).
PRECOND_SOURCE = "GuHuangAI/DDM-Public@8bf8ee23e449 unet/uncond_unet.py"

# The official EDMPrecond.forward casts x, sigma and the labels to float32 whatever use_fp16
# says; a module attribute (not an argument) so float64 parity checks can lift it.
_COMPUTE_DTYPE = torch.float32


class DDMPrecond(nn.Module):
    """The official ``EDMPrecond`` of uncond_unet.py (sigma = t, c_noise = log t):

        c_in  = 1 / sqrt(1 + t)
        c     = (t - 1) * x + t / sqrt(1 + t) * F_c(c_in x, log t)
        eps   = sqrt(t) * x + sqrt((1 - t) / (1 + t)) * F_eps(c_in x, log t)

    These are NOT what a textbook EDM derivation gives for x_t = (1-t) x_0 + sqrt(t) n with
    unit-variance data (std(x_t) = sqrt((1-t)^2 + t), skip/out weights over t^2 - t + 1).
    DDM-Public at ``PRECOND_SOURCE`` uses the simpler expressions above and checkpoints
    trained with it learnt F_c/F_eps under exactly these, so they are copied, not "fixed".
    Upstream later (ADM-Public e6df438, April 2024, "for new performance") switched the same
    class to the t^2 - t + 1 forms; a checkpoint trained with that code needs those instead.
    ``precondition=False`` returns (F_c, F_eps) unchanged. sigma_min/max/data and use_fp16
    are stored by the official class but do not enter its forward pass.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 precondition: bool = True, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.precondition = precondition
        self.model = DualDecoderUNet(img_resolution, img_channels, img_channels, label_dim=label_dim,
                                     **unet_kwargs)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _COMPUTE_DTYPE
        x = x.to(dtype)                                               # (N, C, H, W)
        t = sigma.to(dtype).reshape(-1, 1, 1, 1)                      # (N|1, 1, 1, 1)
        if self.label_dim:
            # official: no labels means a zero label vector (the unconditional embedding)
            class_labels = (torch.zeros([1, self.label_dim], device=x.device, dtype=dtype)
                            if class_labels is None
                            else class_labels.to(dtype).reshape(-1, self.label_dim))
        else:
            class_labels = None
        # the official expressions, in its order (same float32 rounding)
        c_skip1 = t - 1
        c_skip2 = t.sqrt()
        c_out1 = t / (1 + t).sqrt()
        c_out2 = ((1 - t) / (1 + t)).sqrt()
        c_in = 1 / torch.sqrt(1 + t)
        f_c, f_eps = self.model(c_in * x, t.log().flatten(), class_labels, augment_labels)
        if not self.precondition:
            return f_c, f_eps
        return c_skip1 * x + c_out1 * f_c, c_skip2 * x + c_out2 * f_eps


class DDMExport(nn.Module):
    """Export view: forward(x, t[, y]) -> (c, eps). y is an int64 class index per sample;
    the null label (= label_dim) becomes the all-zero label vector, i.e. unconditional."""

    def __init__(self, net: DDMPrecond):
        super().__init__()
        self.net = net
        if net.label_dim:
            self.register_buffer("classes", torch.arange(net.label_dim), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        labels = None
        if self.net.label_dim and y is not None:
            labels = (y[:, None] == self.classes[None]).to(torch.float32)   # (N, label_dim) one-hot
        c, eps = self.net(x, t, labels)
        return c, eps


def _norm_widths(cfg: dict):
    """(channels, attention) of every UNetBlock output and every GroupNorm input, walking the
    channel bookkeeping of DualDecoderUNet without building it (both decoders are alike)."""
    mc, mults, blocks = cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"]
    cout, skips = mc * mults[0], [mc * mults[0]]
    for level, mult in enumerate(mults):
        res = cfg["img_resolution"] >> level
        skips += [cout] if level else []                              # the down block keeps cout
        for _ in range(blocks):
            yield cout, False                                         # the block's norm0 input
            cout = mc * mult
            yield cout, res in cfg["attn_resolutions"]
            skips.append(cout)
    yield cout, True                                                  # the decoder's in0 has attention
    for level, mult in reversed(list(enumerate(mults))):
        res = cfg["img_resolution"] >> level
        for _ in range(blocks + 1):
            yield cout + skips.pop(), False                           # the skip is concatenated
            cout = mc * mult
            yield cout, res in cfg["attn_resolutions"]


def _check_widths(cfg: dict) -> str | None:
    """GroupNorm uses min(32, C // 4) groups, which must divide C; attention uses C // 64
    heads, which must divide C too (ddm_blocks.GroupNorm / UNetBlock)."""
    for width, attention in _norm_widths(cfg):
        groups, heads = min(32, width // 4), width // 64
        if groups < 1 or width % groups:
            return (f"model_channels {cfg['model_channels']} with channel_mult {cfg['channel_mult']} gives a "
                    f"{width}-channel GroupNorm, which min(32, C // 4) = {groups} groups cannot split")
        if attention and heads and width % heads:
            return (f"model_channels {cfg['model_channels']} with channel_mult {cfg['channel_mult']} gives a "
                    f"{width}-channel attention block, which {heads} heads of 64 cannot split")
    return None


# The official yaml ``unet:`` keyword arguments: EDMPrecond's, then DhariwalUNet's, with the
# official defaults. sigma_* and use_fp16 do not enter the forward pass (sigma_max may be inf).
SCHEMA = Schema("ddm", {
    "class_name": choice(OFFICIAL_CLASS, OFFICIAL_CLASS),
    "img_resolution": pos_int(), "img_channels": pos_int(),
    "label_dim": nonneg_int(0), "use_fp16": boolean(False), "sigma_min": Field("number", 0, lo=0),
    "sigma_max": pos_float(float("inf"), finite=False), "sigma_data": pos_float(0.5),
    "model_type": choice("DhariwalUNet", "DhariwalUNet"), "precondition": boolean(True),
    "augment_dim": nonneg_int(0), "model_channels": pos_int(192),
    "channel_mult": Field("ints", [1, 2, 3, 4], lo=1, nonempty=True), "channel_mult_emb": pos_int(4),
    "num_blocks": pos_int(3), "attn_resolutions": Field("ints", [32, 16, 8], lo=1),
    "dropout": fraction(0.10), "label_dropout": fraction(0), "out_mul": Field("number", 1),
}, rules=(
    # the preconditioner adds x to F_c, which only works with out_mul == 1 (the
    # ddm_linear configs set 2 for a different parameterisation)
    rule(lambda c: c["out_mul"] == 1, "out_mul must be 1 (the constant-C decoupled model), got {out_mul}"),
    rule(lambda c: c["img_resolution"] % (1 << (len(c["channel_mult"]) - 1)) == 0,
         "img_resolution {img_resolution} must be divisible by 2**(len(channel_mult)-1) "
         "for channel_mult {channel_mult}"),
    _check_widths,
), unknown="unknown config key(s) {keys}; EDMPrecond/DhariwalUNet accept {allowed}")


def normalize_config(config: dict) -> dict:
    """The official yaml ``unet:`` keyword arguments, validated (ConfigError), with defaults
    filled in; ``class_name`` is checked and dropped."""
    full = SCHEMA.check(config)
    full.pop("class_name")
    return full


def _unet_kwargs(full: dict) -> dict:
    keep = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
            "attn_resolutions")
    return {k: (list(full[k]) if isinstance(full[k], (list, tuple)) else full[k]) for k in keep}


def build(config: dict) -> DDMExport:
    full = normalize_config(config)
    net = DDMPrecond(full["img_resolution"], full["img_channels"], label_dim=full["label_dim"],
                     precondition=full["precondition"], **_unet_kwargs(full))
    return DDMExport(net).eval()


_TRAINING_ONLY = ("dropout", "label_dropout", "use_fp16", "class_name")


def decoupled_process(latent: bool) -> dict:
    """The ModelSpec fields of DDM's constant-attenuation process, shared by every DDM network
    (``ddm`` and the conditional ``ddm_cond``): outputs, prediction, time and schedule."""
    schedule = {
        "type": "ddm_constant",         # x_t = x_0 + C t + sqrt(t) eps, C = -x_0
        "eps": _EPS,                    # training t ~ U(eps, 1)
        "sigma_min": _SIGMA_MIN,        # t_min = sigma_min**2 = 1e-4: where the last step is split
        "sigma_max": _SIGMA_MAX,
        "clip_sample": not latent,      # the pixel sampler clamps x0 to [-1, 1]; the latent one does not
    }
    return dict(outputs=("c", "eps"), prediction="ddm_c_eps", time={"convention": "ddm", "min": _EPS,
                                                                      "max": _SIGMA_MAX}, schedule=schedule)


def _is_latent(config: dict) -> bool:
    # Pixel or latent is a property of the training run, not of the U-Net kwargs; the one
    # published latent U-Net (CelebA-HQ 256 through a 4x KL autoencoder) is recognised.
    def arch(c):
        return {k: v for k, v in normalize_config(c).items() if k not in _TRAINING_ONLY}
    return arch(config) == arch(CONFIGS["celebahq-ldm"])


def spec(config: dict) -> ModelSpec:
    full = normalize_config(config)
    latent = _is_latent(config)
    label_dim = full["label_dim"]
    res, ch = full["img_resolution"], full["img_channels"]
    extra = {"official_class": OFFICIAL_CLASS, "model_type": "DhariwalUNet",
             "precondition": bool(full["precondition"]), "precond_source": PRECOND_SOURCE,
             "official_sampling_timesteps": SAMPLING_STEPS}
    if latent:
        extra.update(latent_scale_factor=0.165, first_stage="AutoencoderKL embed_dim 3, ch_mult [1,2,4] (4x)")
    return ModelSpec(
        sample_shape=(ch, res, res),
        **decoupled_process(latent),
        num_classes=label_dim or None,
        null_label=label_dim if label_dim else None,
        space="latent" if latent else "pixel",
        extra=extra,
    )


# ``unet:`` sections of the official yaml files (class_name dropped).
CONFIGS: dict[str, dict] = {
    # configs/cifar10/ddm_uncond_const_uncond_unet.yaml (pixel space, 32x32)
    "cifar10": dict(img_resolution=32, img_channels=3, sigma_data=1.0, model_type="DhariwalUNet",
                    model_channels=192, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=3,
                    attn_resolutions=[16, 8], dropout=0.1, label_dropout=0, augment_dim=9),
    # configs/celebahq/celeb_uncond_ddm_const_uncond_unet_ldm.yaml (latent 3x64x64 of 256x256)
    "celebahq-ldm": dict(img_resolution=64, img_channels=3, sigma_data=1.0, model_type="DhariwalUNet",
                         model_channels=96, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                         attn_resolutions=[32, 16], dropout=0.1, label_dropout=0, augment_dim=0),
    # test fixture: class-conditional, two attention heads at 4x4 (none at 8x8: 32 channels
    # give zero heads), an unused augmentation weight
    "tiny": dict(img_resolution=8, img_channels=1, label_dim=10, sigma_data=1.0, model_type="DhariwalUNet",
                 model_channels=32, channel_mult=[1, 4], channel_mult_emb=2, num_blocks=1,
                 attn_resolutions=[8, 4], dropout=0.0, label_dropout=0, augment_dim=2),
}

FAMILY = Family(
    name="ddm",
    build=build,
    spec=spec,
    configs=CONFIGS,
    fixture="tiny",
    official=lambda module: module.net,
    description="Decoupled diffusion model (arXiv 2306.13720): EDM-preconditioned ADM U-Net "
                "with two decoders predicting C (image to zero) and eps (zero to noise)",
)
