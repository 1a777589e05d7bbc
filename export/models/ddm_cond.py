"""DDM's conditional dual U-Net (arXiv 2306.13720; GuHuangAI/DDM-Public ``unet/cond_unet.py``
``Unet``), split for deployment into a condition encoder and a denoiser.

The official model (reimplemented here with its state-dict names; see ``ddm_cond_blocks``
and ``ddm_cond_backbones``):

    init_conv_mask   condition backbone (Swin-B) -> 4 multi-scale maps hm[0..3]
    init_conv        7x7 conv + GN of [x, hm[0] resized bilinearly to x's size]
    projects.i       1x1 convs hm[i] -> the U-Net width of level i
    time_mlp         Gaussian Fourier features of log t -> MLP
    downs.i / relation_layers_down.i   ResNet, relation (cross-attention to hm[i]), ResNet,
                     linear attention, downsample
    mid_block1, mid_attn, mid_block2, decouple1/2 (GN - conv - spatial gate)
    ups.i + relation_layers_up.i + final_res_block/final_conv      -> C
    ups2.i + relation_layers_up2.i + final_res_block2/final_conv2  -> eps
    preconditioning: C = (t-1) x + t/sqrt(1+t) F_C,  eps = sqrt(t) x + sqrt(1-t)/sqrt(1+t) F_eps

Nothing the condition branch computes depends on x or t, yet the official forward re-runs the
backbone at every step. The bundle therefore holds two graphs:

    cond_encoder.onnx   cond [B, Cc, Hc, Wc] -> cond_init, cond_feat0..3
    model.onnx          x, t, cond_init, cond_feat0..3 -> c, eps

``cond_init`` = hm[0] resized to x's size (what ``init_conv`` concatenates), ``cond_featI`` =
projects[I](hm[I]) (what the relation layers read, the same in both decoders). The runtime
runs the encoder once per condition and feeds the features by name at every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ddm import SAMPLING_STEPS, decoupled_process
from .ddm_blocks import SpatialAttention
from .ddm_cond_backbones import SWIN_B, SmallEncoder, SwinBackbone, feature_sizes
from .ddm_cond_blocks import (Attention, GaussianFourier, LearnedPosition, LinearAttention, PreNormResidual,
                              RandomFourier, RelationNet, ResnetBlock, downsample, upsample)
from .family import Family, ModelSpec
from .validation import Field, Schema, boolean, choice, pos_float, pos_int, rule

OFFICIAL_CLASS = "unet.cond_unet.Unet"
SOURCE = "GuHuangAI/DDM-Public@8bf8ee23e449 unet/cond_unet.py, unet/swin_transformer.py"
FEATURES = ("cond_init", "cond_feat0", "cond_feat1", "cond_feat2", "cond_feat3")
COND_INPUT = "cond"


class CondUnet(nn.Module):
    """The official ``Unet`` (state-dict compatible). ``forward(x, t, cond)`` is the official
    one; ``encode`` and ``denoise`` are its two halves."""

    def __init__(self, cfg: dict):
        super().__init__()
        dim, channels = cfg["dim"], cfg["channels"]
        self.self_condition, self.precondition = cfg["self_condition"], cfg["precondition"]
        init_dim = cfg["init_dim"] or dim
        self.init_conv_mask = _backbone(cfg)
        f = self.init_conv_mask.widths[0]
        self.init_conv = nn.Sequential(nn.Conv2d(channels * (2 if self.self_condition else 1) + f, init_dim, 7, padding=3),
                                       nn.GroupNorm(min(init_dim // 4, 8), init_dim))
        if cfg["cond_pe"]:   # built for its checkpoint keys; the official forward never uses it
            npf = cfg["num_pos_feats"]
            self.cond_pos_embedding = nn.Sequential(LearnedPosition(_pair(cfg["cond_feature_size"]), npf // 2),
                                                    nn.Conv2d(npf + init_dim, init_dim, 1))
        dims = [init_dim, *(dim * m for m in cfg["dim_mults"])]
        self.projects = nn.ModuleList(nn.Conv2d(w, dims[i], 1) for i, w in enumerate(self.init_conv_mask.widths))
        time_dim = dim * 4
        if cfg["learned_sinusoidal_cond"] or cfg["random_fourier_features"]:
            fourier, fdim = RandomFourier(cfg["learned_sinusoidal_dim"], cfg["random_fourier_features"]), \
                cfg["learned_sinusoidal_dim"] + 1
        else:
            fourier, fdim = GaussianFourier(dim // 2, cfg["fourier_scale"]), dim
        self.time_mlp = nn.Sequential(fourier, nn.Linear(fdim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        self._build_levels(cfg, dims, time_dim)
        self.final_res_block = ResnetBlock(dim * 2, dim, time_emb_dim=time_dim, groups=cfg["resnet_block_groups"])
        self.final_conv = nn.Conv2d(dim, channels * cfg["out_mul"], 1)
        self.final_res_block2 = ResnetBlock(dim * 2, dim, time_emb_dim=time_dim, groups=cfg["resnet_block_groups"])
        self.final_conv2 = nn.Conv2d(dim, channels, 1)

    def _build_levels(self, cfg, dims, time_dim):
        block = lambda a, b: ResnetBlock(a, b, time_emb_dim=time_dim, groups=cfg["resnet_block_groups"])  # noqa: E731
        w1, w2 = cfg["window_sizes1"], cfg["window_sizes2"]
        pairs = list(zip(dims[:-1], dims[1:]))
        self.downs, self.relation_layers_down = nn.ModuleList(), nn.ModuleList()
        for i, (din, dout) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.downs.append(nn.ModuleList([block(din, din), block(din, din), PreNormResidual(din, LinearAttention(din)),
                                             nn.Conv2d(din, dout, 3, padding=1) if last else downsample(din, dout)]))
            self.relation_layers_down.append(RelationNet(dims[i], dims[i], dims[i], w1[i], w2[i]))
        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = PreNormResidual(mid, Attention(mid))
        self.mid_block2 = block(mid, mid)
        for name in ("decouple1", "decouple2"):
            setattr(self, name, nn.Sequential(nn.GroupNorm(min(mid // 4, 8), mid), nn.Conv2d(mid, mid, 3, padding=1),
                                              SpatialAttention(mid)))
        rev = dims[::-1]
        for suffix in ("", "2"):
            ups, rels = nn.ModuleList(), nn.ModuleList()
            for i, (din, dout) in enumerate(reversed(pairs)):
                last = i == len(pairs) - 1
                ups.append(nn.ModuleList([block(dout + din, dout), block(dout + din, dout),
                                          PreNormResidual(dout, LinearAttention(dout)),
                                          nn.Conv2d(dout, din, 3, padding=1) if last else upsample(dout, din)]))
                rels.append(RelationNet(rev[i + 1], rev[i], rev[i], w1[::-1][i], w2[::-1][i]))
            setattr(self, "ups" + suffix, ups)
            setattr(self, "relation_layers_up" + suffix, rels)

    # --- the condition half (x- and t-independent) -------------------------------------------
    def encode(self, cond: torch.Tensor, size) -> list[torch.Tensor]:
        """cond (N, Cc, Hc, Wc) -> [hm[0] resized to ``size``, projects[i](hm[i]) for i < 4]."""
        hm = self.init_conv_mask(cond)
        first = F.interpolate(hm[0], size=tuple(size), mode="bilinear")        # (N, f, H, W)
        return [first, *(proj(h) for proj, h in zip(self.projects, hm))]

    # --- the x/t half ---------------------------------------------------------------------------
    def denoise(self, x, time, cond_init, feats) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = x
        if self.self_condition:   # the official sampler passes no self-condition: zeros
            x = torch.cat((torch.zeros_like(x), x), dim=1)
        h = self.init_conv(torch.cat([x, cond_init], dim=1))                    # (N, init_dim, H, W)
        r = h
        emb = self.time_mlp(time.log())                                         # (N, 4 dim)
        skips = []
        for i, ((b1, b2, attn, down), rel) in enumerate(zip(self.downs, self.relation_layers_down)):
            h = b1(h, emb)
            skips.append(h)
            h = attn(b2(rel(feats[i], h), emb))
            skips.append(h)
            h = down(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        c = self._decode(h + self.decouple1(h), self.ups, self.relation_layers_up, list(skips), list(feats), emb)
        c = self.final_conv(self.final_res_block(torch.cat((c, r), dim=1), emb))
        e = self._decode(h + self.decouple2(h), self.ups2, self.relation_layers_up2, list(skips), list(feats), emb)
        e = self.final_conv2(self.final_res_block2(torch.cat((e, r), dim=1), emb))
        if self.precondition:
            t = time.reshape(-1, 1, 1, 1)
            c = (-1 + t) * x_in + t / (t + 1).sqrt() * c
            e = t.sqrt() * x_in + (1 - t).sqrt() / (1 + t).sqrt() * e
        return c, e

    @staticmethod
    def _decode(h, ups, rels, skips, feats, emb):
        for (b1, b2, attn, up), rel in zip(ups, rels):
            h = b1(torch.cat((h, skips.pop()), dim=1), emb)
            h = rel(feats.pop(), h)
            h = b2(torch.cat((h, skips.pop()), dim=1), emb)
            h = up(attn(h))
        return h

    def forward(self, x, time, cond):
        first, *feats = self.encode(cond, x.shape[-2:])
        return self.denoise(x, time, first, feats)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _backbone(cfg: dict) -> nn.Module:
    if cfg["cond_net"] == "swin":
        depths = tuple(cfg["swin_depths"] or SWIN_B["depths"])
        return SwinBackbone(1 if cfg["single_channel_cond"] else 3, SWIN_B["embed_dim"], depths, SWIN_B["heads"],
                            SWIN_B["window"])
    return SmallEncoder(cfg["cond_in_dim"], cfg["small_width"], cfg["small_stride"])


class CondEncoderView(nn.Module):
    """cond -> (cond_init, cond_feat0..3): the bundle's ``cond_encoder`` component."""

    def __init__(self, net: CondUnet, sample_hw):
        super().__init__()
        self.net, self.sample_hw = net, tuple(sample_hw)

    def forward(self, cond):
        return tuple(self.net.encode(cond, self.sample_hw))


class DenoiserView(nn.Module):
    """(x, t, cond_init, cond_feat0..3) -> (c, eps): the bundle's ``model.onnx``."""

    def __init__(self, net: CondUnet):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond_init, cond_feat0, cond_feat1, cond_feat2, cond_feat3):
        return self.net.denoise(x, t, cond_init, [cond_feat0, cond_feat1, cond_feat2, cond_feat3])


# --- config ---------------------------------------------------------------------------------

def _window_list(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 4
            and all(isinstance(w, (list, tuple)) and len(w) == 2 and all(type(i) is int and i >= 1 for i in w) for w in v))


def _widths_ok(cfg) -> str | None:
    dims = [cfg["init_dim"] or cfg["dim"], *(cfg["dim"] * m for m in cfg["dim_mults"])]
    g = cfg["resnet_block_groups"]
    for d in dims:
        if d % g or d % 8:
            return (f"dim {cfg['dim']} with dim_mults {cfg['dim_mults']} gives a {d}-channel level, which "
                    f"resnet_block_groups {g} and the relation layers' 8 heads / 8 GroupNorm groups cannot split")
        if (d // 2) % 2:
            return f"a {d}-channel level cannot carry the relation layers' sine position code (needs a multiple of 4)"
    return None


WINDOWS = Field("any", [[16, 16], [8, 8], [4, 4], [2, 2]], words="a list of 4 [height, width] windows of positive integers")
SIZE = Field("size", None, lo=1, optional=True)

# The official yaml ``unet:`` section (Unet keyword arguments and the ``cfg`` keys it reads,
# flat as the yaml holds them), then the edgediff keys (sizes, space, the small encoder).
SCHEMA = Schema("ddm_cond", {
    "class_name": choice(OFFICIAL_CLASS, OFFICIAL_CLASS),
    "dim": pos_int(), "init_dim": Field("int", None, lo=1, optional=True),
    "out_dim": Field("int", None, lo=1, optional=True),
    "dim_mults": Field("ints", [1, 2, 4, 8], lo=1), "channels": pos_int(1), "out_mul": pos_int(1),
    "cond_in_dim": pos_int(1), "cond_dim": pos_int(64), "cond_dim_mults": Field("ints", [2, 4, 8], lo=1),
    "self_condition": boolean(False), "resnet_block_groups": pos_int(8), "learned_variance": boolean(False),
    "learned_sinusoidal_cond": boolean(False), "random_fourier_features": boolean(False),
    "learned_sinusoidal_dim": pos_int(16), "window_sizes1": WINDOWS, "window_sizes2": WINDOWS,
    "fourier_scale": pos_float(16), "precondition": boolean(True),
    "ckpt_path": Field("any", None, choices=(None,), words="null (give the weights with --checkpoint)"), "ignore_keys": Field("strs", []),
    # cfg keys (the official constructor reads them from the same yaml section)
    "cond_net": choice("swin", "swin", "effnet", "resnet", "small"), "cond_pe": boolean(False),
    "num_pos_feats": pos_int(128), "cond_feature_size": Field("size", [128, 128], lo=1),
    "single_channel_cond": boolean(False), "fix_bb": boolean(False),
    # edgediff keys
    "sample_size": SIZE, "cond_size": SIZE, "space": choice("latent", "latent", "pixel"),
    "swin_depths": Field("ints", None, lo=1, optional=True),
    "small_width": pos_int(32), "small_stride": Field("int", 1, lo=1, hi=4),
}, rules=(
    rule(lambda c: c["cond_net"] in ("swin", "small"),
         "cond_net {cond_net!r} is not supported by this exporter (supported: 'swin', the published one, "
         "and edgediff's 'small')"),
    rule(lambda c: len(c["dim_mults"]) == 4, "dim_mults must have 4 entries (one per condition feature level), got {dim_mults}"),
    rule(lambda c: _window_list(c["window_sizes1"]) and _window_list(c["window_sizes2"]),
         "window_sizes1 and window_sizes2 must each be a list of 4 [height, width] pairs of positive integers"),
    rule(lambda c: not c["learned_variance"] and c["out_mul"] == 1 and c["out_dim"] in (None, c["channels"]),
         "learned_variance, out_mul != 1 and out_dim != channels change the output width, which the "
         "preconditioning (C = (t-1) x + ...) cannot add to x; only the constant-C model is exported"),
    rule(lambda c: c["dim"] % 2 == 0, "dim must be even (Gaussian Fourier features of dim/2 frequencies), got {dim}"),
    rule(lambda c: c["learned_sinusoidal_dim"] % 2 == 0, "learned_sinusoidal_dim must be even"),
    rule(lambda c: c["cond_net"] != "swin" or c["cond_in_dim"] == (1 if c["single_channel_cond"] else 3),
         "cond_in_dim {cond_in_dim} disagrees with the Swin backbone, which takes 3 channels (1 with "
         "single_channel_cond: true)"),
    rule(lambda c: c["swin_depths"] is None or len(c["swin_depths"]) == 4, "swin_depths must have 4 entries"),
    rule(lambda c: c["small_width"] % 8 == 0 or c["cond_net"] != "small", "small_width must be a multiple of 8"),
    _widths_ok,
), unknown="unknown config key(s) {keys}; cond_unet.Unet and edgediff accept {allowed}")


def normalize_config(config: dict) -> dict:
    """Validated config with defaults. Sizes default from ``cond_feature_size`` as the
    published latent configs use it: x (the latent) at that size, the condition image at 4x
    (Swin's first map, hm[0], is 1/4 of the condition)."""
    cfg = SCHEMA.check(config)
    cfg.pop("class_name")
    fs = _pair(cfg["cond_feature_size"])
    cfg["sample_size"] = list(_pair(cfg["sample_size"])) if cfg["sample_size"] is not None else list(fs)
    default_cond = [4 * fs[0], 4 * fs[1]] if cfg["cond_net"] == "swin" else list(cfg["sample_size"])
    cfg["cond_size"] = list(_pair(cfg["cond_size"])) if cfg["cond_size"] is not None else default_cond
    smallest = min(s for hw in feature_sizes(cfg["cond_net"], cfg["cond_size"], cfg["small_stride"]) for s in hw)
    if smallest < 1 or min(cfg["cond_size"]) < (4 if cfg["cond_net"] == "swin" else 1):
        SCHEMA.fail(f"cond_size {cfg['cond_size']} is too small for the {cfg['cond_net']} encoder")
    h, w = cfg["sample_size"]
    if h % 8 or w % 8:
        SCHEMA.fail(f"sample_size {cfg['sample_size']} must be divisible by 8 (three 2x downsamplings)")
    return cfg


def cond_channels(cfg: dict) -> int:
    if cfg["cond_net"] == "swin":
        return 1 if cfg["single_channel_cond"] else 3
    return cfg["cond_in_dim"]


def feature_decls(cfg: dict) -> dict:
    """The features' declarations (per-row shapes; batch symbolic), in graph order."""
    dims = [cfg["init_dim"] or cfg["dim"], *(cfg["dim"] * m for m in cfg["dim_mults"])]
    first = SWIN_B["embed_dim"] if cfg["cond_net"] == "swin" else cfg["small_width"]
    sizes = feature_sizes(cfg["cond_net"], cfg["cond_size"], cfg["small_stride"])
    decls = {"cond_init": [first, *cfg["sample_size"]]}
    decls.update({f"cond_feat{i}": [dims[i], *sizes[i]] for i in range(4)})
    return {n: {"dtype": "float32", "shape": ["batch", *s]} for n, s in decls.items()}


def build(config: dict) -> DenoiserView:
    cfg = normalize_config(config)
    return DenoiserView(CondUnet(cfg)).eval()


def companions(module: DenoiserView, config: dict) -> dict:
    """The bundle's extra graphs: name -> (module, inputs, outputs), in export order."""
    cfg = normalize_config(config)
    h, w = cfg["cond_size"]
    inputs = {COND_INPUT: {"dtype": "float32", "shape": ["batch", cond_channels(cfg), h, w]}}
    return {"cond_encoder": (CondEncoderView(module.net, cfg["sample_size"]).eval(), inputs, feature_decls(cfg))}


def spec(config: dict) -> ModelSpec:
    cfg = normalize_config(config)
    latent = cfg["space"] == "latent"
    return ModelSpec(
        sample_shape=(cfg["channels"], *cfg["sample_size"]),
        **decoupled_process(latent),
        space=cfg["space"],
        features=feature_decls(cfg),
        extra={"official_class": OFFICIAL_CLASS, "source": SOURCE, "cond_net": cfg["cond_net"],
               "precondition": bool(cfg["precondition"]), "official_sampling_timesteps": SAMPLING_STEPS,
               "cond_encoder": {"component": "cond_encoder", "input": COND_INPUT, "features": list(FEATURES),
                                "cond_shape": [cond_channels(cfg), *cfg["cond_size"]], "cond_range": [-1.0, 1.0]}},
    )


# The ``unet:`` sections of the official yamls (class_name dropped) with their sizes:
# ``sample_size`` the denoised tensor (latent: image / 4 through DDM's KL first stage),
# ``cond_size`` the condition image (``data.image_size``).
_COMMON = dict(class_name=OFFICIAL_CLASS, fix_bb=False, cond_net="swin", out_mul=1, cond_dim=128, cond_dim_mults=[],
               fourier_scale=16, cond_pe=False, num_pos_feats=128)
_W8 = [[8, 8], [4, 4], [2, 2], [1, 1]]
CONFIGS: dict[str, dict] = {
    # configs/super-resolution/div2k_cond_ddm_const_ldm.yaml (512x512, latent 3x128x128)
    "div2k-sr": dict(_COMMON, dim=128, channels=3, dim_mults=[1, 2, 4, 4], cond_in_dim=3, window_sizes1=_W8,
                     window_sizes2=[[4, 4], [2, 2], [1, 1], [1, 1]], cond_feature_size=[128, 128],
                     sample_size=[128, 128], cond_size=[512, 512], space="latent"),
    # configs/saliency/DUTS_ddm_const_ldm_114.yaml (384x384, latent 3x96x96)
    "duts-saliency-ldm": dict(_COMMON, dim=128, channels=3, dim_mults=[1, 2, 4, 4], cond_in_dim=3, window_sizes1=_W8,
                              window_sizes2=_W8, cond_feature_size=[96, 96], sample_size=[96, 96],
                              cond_size=[384, 384], space="latent"),
    # configs/saliency/DUTS_ddm_const_dpm_114.yaml (pixel space, 1x128x128)
    "duts-saliency": dict(_COMMON, dim=128, channels=1, dim_mults=[1, 2, 4, 4], cond_in_dim=3, window_sizes1=_W8,
                          window_sizes2=_W8, cond_feature_size=[128, 128], sample_size=[128, 128],
                          cond_size=[128, 128], space="pixel"),
    # configs/inpainting/celebahq_ddm_const4_condunet5_6202.yaml (256x256, latent 3x64x64)
    "celebahq-inpaint": dict(_COMMON, dim=96, channels=3, dim_mults=[1, 2, 4, 8], cond_in_dim=3, window_sizes1=_W8,
                             window_sizes2=_W8, cond_feature_size=[64, 64], sample_size=[64, 64],
                             cond_size=[256, 256], space="latent"),
    # configs/sketch2img/sketchcoco_ddm_const4_ldm_unet6_114.yaml (single-channel sketch, latent 3x64x64)
    "sketchcoco": dict(_COMMON, single_channel_cond=True, dim=128, channels=3, dim_mults=[1, 2, 4, 4], cond_in_dim=1,
                       window_sizes1=_W8, window_sizes2=_W8, cond_feature_size=[128, 128], sample_size=[64, 64],
                       cond_size=[256, 256], space="latent"),
    # test fixture: the edgediff small encoder on a 16x16 condition driving 1x16x16 pixels
    "tiny": dict(dim=16, dim_mults=[1, 2, 2, 4], channels=1, cond_in_dim=1, cond_net="small", small_width=8,
                 window_sizes1=[[2, 2], [2, 2], [1, 1], [1, 1]], window_sizes2=[[2, 2], [1, 1], [1, 1], [1, 1]],
                 sample_size=[16, 16], cond_size=[16, 16], space="pixel"),
    # swin fixture: Swin-B widths, 2+2+1+1 blocks (shifted windows at 16x16 and 8x8), 64x64 condition, 3x16x16 latent
    "tiny-swin": dict(dim=16, dim_mults=[1, 2, 2, 4], channels=3, cond_in_dim=3, cond_net="swin",
                      swin_depths=[2, 2, 1, 1], window_sizes1=[[2, 2], [1, 1], [1, 1], [1, 1]],
                      window_sizes2=[[2, 2], [1, 1], [1, 1], [1, 1]], sample_size=[16, 16], cond_size=[64, 64]),
}

FAMILY = Family(
    name="ddm_cond",
    build=build,
    spec=spec,
    configs=CONFIGS,
    fixture="tiny",
    official=lambda module: module.net,
    companions=companions,
    description="DDM's conditional dual U-Net (cond_unet.Unet): Swin condition encoder (exported once per "
                "condition as cond_encoder.onnx), relation layers, two decoders predicting C and eps",
)
