"""U-ViT (Bao et al., "All are Worth Words", CVPR 2023): a ViT whose time, class and image
patches are all tokens, with U-Net-style long skips between shallow and deep blocks.

Reimplemented from the description of baofff/U-ViT ``libs/uvit.py``. Module and parameter
names follow that file so its released ``.pth`` checkpoints load strictly; the forward pass
uses only reshape/permute/matmul so it exports cleanly with the dynamo ONNX exporter.

Time conventions (verified in baofff/U-ViT):
- ``sde.py`` ``ScoreModel.predict`` calls ``nnet(xt, t * 999)`` with the VP SDE t in [0, 1]
  (``VPSDE(beta_min=0.1, beta_max=20)``). ``train.py`` (pixel models) and ``train_ldm.py`` /
  ``eval_ldm.py`` (ImageNet U-ViT-L latent models) train and sample this way; the samplers
  stop at t = 1e-3 (euler_maruyama) or 1e-4 (dpm_solver). Config key ``timesteps="continuous"``.
- ``train_ldm_discrete.py`` / ``eval_ldm_discrete.py`` (ImageNet U-ViT-H latent models) train
  on integer n in {1..1000} of the Stable Diffusion schedule (sqrt-linear 0.00085..0.012,
  N=1000) and sample with ``nnet(x, t_continuous * N)``, t_continuous in [1/N, 1]. Step n uses
  ``betas[n-1]``, i.e. model t = diffusers timestep + 1. Config key ``timesteps="discrete"``.
Classifier-free guidance (``eval*.py``): the null label is ``dataset.K`` (1000, the last of
``num_classes=1001``) and ``eps = eps_cond + scale * (eps_cond - eps_null)``.

Text-to-image layout (``libs/uvit_t2i.py``, the MS-COCO models): no label; the 77 CLIP text
tokens (``FrozenCLIPEmbedder``: openai/clip-vit-large-patch14's ``last_hidden_state``,
``clip_dim`` 768) go through ``context_embed`` (Linear) and sit between the time token and the
patches: [time, context..., patches]. A config means this layout when it names ``clip_dim`` or
``num_clip_token`` (the keys only that constructor has; the published config names both).
``train_t2i_discrete.py`` trains it on the discrete steps n = 1..1000 (``timesteps="discrete"``).
Its guidance uses the empty prompt's context as the null condition.
"""
from __future__ import annotations

import torch
from torch import nn

from edgediff.runtime.errors import InvalidInput

from .common import sinusoidal_embedding, timestep_frequencies
from .family import Family, ModelSpec
from .validation import Field, Schema, boolean, choice, pos_float, pos_int, rule

# The official UViT(...) keyword arguments and their defaults.
OFFICIAL_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                         mlp_ratio=4.0, qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm,
                         mlp_time_embed=False, num_classes=-1, use_checkpoint=False, conv=True, skip=True)
# The official uvit_t2i UViT(...) keyword arguments: no num_classes, a CLIP context instead.
T2I_DEFAULTS = {**{k: v for k, v in OFFICIAL_DEFAULTS.items() if k != "num_classes"},
                "clip_dim": 768, "num_clip_token": 77}
T2I_ONLY = ("clip_dim", "num_clip_token")
CONTEXT = "context"          # the t2i export's extra input: CLIP text embeddings (N, tokens, clip_dim)
# edgediff-only keys a config may add: they describe how the checkpoint was trained, not the
# network. ``cfg``: trained with a null class (the last label) for classifier-free guidance;
# ``cfg_scale``: the guidance scale the official eval config uses.
EXTRA_DEFAULTS = dict(timesteps="continuous", cfg=False, cfg_scale=None)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> tokens."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                                           # (N, D, h, w)
        return x.flatten(2).transpose(1, 2)                        # (N, h*w, D), row-major


class Attention(nn.Module):
    """Multi-head self-attention; the fused qkv features are ordered (qkv, head, head_dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None):
        super().__init__()
        self.num_heads = num_heads
        # `or` as upstream: qk_scale=None (every published config) or 0 falls back to the default.
        # Upstream's SDPA path ignores qk_scale entirely; with None both agree exactly.
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)             # each (N, H, T, Dh)
        # Explicit matmul-softmax exports to plain MatMul/Softmax on every opset.
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (N, H, T, T)
        out = (attn @ v).transpose(1, 2).reshape(n, length, dim)   # (N, T, D), heads concatenated
        return self.proj(out)


class Mlp(nn.Module):
    """timm's Mlp as upstream uses it: fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first fuse the long skip with a linear layer."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: float | None, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None   # absent from state_dict if None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))      # (N, T, D); main branch first
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def is_t2i(config: dict) -> bool:
    """Does a config (or kwargs) describe the libs/uvit_t2i.py layout?"""
    return any(k in config for k in T2I_ONLY)


class UViT(nn.Module):
    """The official-layout module: ``UViT(**official_kwargs)(x, timesteps, y=None) -> eps`` for
    libs/uvit.py kwargs, ``(x, timesteps, context) -> eps`` for libs/uvit_t2i.py kwargs."""

    def __init__(self, **kwargs):
        super().__init__()
        self.t2i = is_t2i(kwargs)
        defaults = T2I_DEFAULTS if self.t2i else OFFICIAL_DEFAULTS
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            raise InvalidInput(f"unknown UViT arguments {unknown}; expected a subset of {sorted(defaults)}")
        cfg = {**defaults, **kwargs}
        if cfg["norm_layer"] is not nn.LayerNorm:
            raise InvalidInput("UViT: only the default norm_layer (nn.LayerNorm) is supported")
        dim, patch, self.in_chans = cfg["embed_dim"], cfg["patch_size"], cfg["in_chans"]
        self.embed_dim, self.patch_size = dim, patch
        self.grid = cfg["img_size"] // patch
        self.num_classes = cfg.get("num_classes", -1)
        if self.t2i:                                                # time token + the text tokens
            self.extras = 1 + cfg["num_clip_token"]
        else:                                                       # label token (if any) + time token
            self.extras = 2 if self.num_classes > 0 else 1

        self.patch_embed = PatchEmbed(patch, self.in_chans, dim)
        self.time_embed = (nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
                           if cfg["mlp_time_embed"] else nn.Identity())
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, dim)
        if self.t2i:
            self.context_embed = nn.Linear(cfg["clip_dim"], dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.grid ** 2, dim))
        block = dict(dim=dim, num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                     qkv_bias=cfg["qkv_bias"], qk_scale=cfg["qk_scale"])
        half = cfg["depth"] // 2                                    # depth 12 -> 6 + mid + 6 blocks
        self.in_blocks = nn.ModuleList(Block(**block) for _ in range(half))
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList(Block(**block, skip=cfg["skip"]) for _ in range(half))
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch * patch * self.in_chans)
        self.final_layer = (nn.Conv2d(self.in_chans, self.in_chans, 3, padding=1)
                            if cfg["conv"] else nn.Identity())
        # Not in the state_dict: upstream recomputes these per call from the same float32 formula.
        self.register_buffer("freqs", timestep_frequencies(dim, 10000.0), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Upstream's init (trunc-normal 0.02), so untrained test models are not degenerate."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p); features are ordered (p1, p2, C)."""
        n, g, p, c = x.shape[0], self.grid, self.patch_size, self.in_chans
        x = x.reshape(n, g, g, p, p, c)                             # (N, h, w, p1, p2, C)
        x = x.permute(0, 5, 1, 3, 2, 4)                             # (N, C, h, p1, w, p2)
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if self.t2i and (context is None or y is not None):
            raise InvalidInput("the text-to-image UViT takes (x, timesteps, context) and no y")
        if not self.t2i and ((y is None) != (self.num_classes <= 0) or context is not None):
            raise InvalidInput(f"UViT with num_classes={self.num_classes} needs y exactly when conditional")
        patches = self.patch_embed(x)                               # (N, L, D)
        emb = sinusoidal_embedding(timesteps, self.freqs, self.embed_dim, cos_first=True)
        tokens = [self.time_embed(emb)[:, None], patches]          # time token before the patches
        if y is not None:
            tokens.insert(0, self.label_emb(y)[:, None])           # label token goes first
        if context is not None:
            tokens.insert(1, self.context_embed(context))          # (N, tokens, D) between time and patches
        h = torch.cat(tokens, dim=1) + self.pos_embed               # (N, extras + L, D)

        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())                                 # deepest in-block meets first out-block

        h = self.decoder_pred(self.norm(h))[:, self.extras:]        # (N, L, p*p*C), extra tokens dropped
        return self.final_layer(self.unpatchify(h))                 # (N, C, H, W)


class UViTDenoiser(nn.Module):
    """Export view: ``forward(x, t[, y | context]) -> (eps,)`` around the official-layout module."""

    def __init__(self, net: UViT):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None):
        if self.net.t2i:
            return (self.net(x, t, context=cond),)
        return (self.net(x, t, cond),)


# Both kinds of keys as data. num_classes <= 0 means unconditional (upstream uses -1).
SCHEMA = Schema("uvit", {
    "img_size": pos_int(224), "patch_size": pos_int(16), "in_chans": pos_int(3), "embed_dim": pos_int(768),
    "depth": pos_int(12), "num_heads": pos_int(12), "mlp_ratio": pos_float(4.0), "qkv_bias": boolean(False),
    "qk_scale": pos_float(None, optional=True),
    # a Python class, not JSON: only the default is implemented
    "norm_layer": Field("any", nn.LayerNorm, choices=(nn.LayerNorm,),
                        words="left out (only the default nn.LayerNorm is supported)"),
    "mlp_time_embed": boolean(False), "num_classes": Field("int", -1, lo=-1), "use_checkpoint": boolean(False),
    "conv": boolean(True), "skip": boolean(True),
    # libs/uvit_t2i.py only (naming either selects that layout)
    "clip_dim": pos_int(768), "num_clip_token": pos_int(77),
    "timesteps": choice("continuous", "continuous", "discrete"), "cfg": boolean(False),
    "cfg_scale": Field("number", None, lo=0, optional=True),
}, rules=(
    # a remainder would be cropped away: the model would return a smaller image than bundle.json says
    rule(lambda c: c["img_size"] % c["patch_size"] == 0, "patch_size {patch_size} must divide img_size {img_size}"),
    rule(lambda c: c["embed_dim"] % c["num_heads"] == 0,
         "embed_dim {embed_dim} must be divisible by num_heads {num_heads}"),
    rule(lambda c: int(c["embed_dim"] * c["mlp_ratio"]) >= 1,
         "mlp_ratio {mlp_ratio} leaves the MLP of embed_dim {embed_dim} without units"),
), unknown="unknown U-ViT config keys {keys}; allowed: {allowed}")


def _split(config: dict) -> tuple[dict, dict]:
    """Config -> (official UViT kwargs, edgediff training facts), validated (ConfigError)."""
    if isinstance(config, dict) and is_t2i(config) and "num_classes" in config:
        SCHEMA.fail("num_classes is a libs/uvit.py key; a text-to-image config (clip_dim / num_clip_token, "
                    "libs/uvit_t2i.py) has no label, it takes a CLIP context")
    full = SCHEMA.check(config)
    t2i = is_t2i(config)
    # t2i guidance's null is the empty prompt's context, not a label
    if full["cfg"] and not t2i and full["num_classes"] < 2:
        SCHEMA.fail(f"cfg=True needs num_classes >= 2 (the last label is the null class), got {full['num_classes']}")
    official = {k: v for k, v in config.items() if k in (T2I_DEFAULTS if t2i else OFFICIAL_DEFAULTS)}
    return official, {k: full[k] for k in EXTRA_DEFAULTS}


def build(config: dict) -> UViTDenoiser:
    official, _ = _split(config)
    return UViTDenoiser(UViT(**official)).eval()


def _time_and_schedule(timesteps: str) -> tuple[dict, dict]:
    if timesteps == "continuous":
        # sde.py: nnet(xt, t * 999), t ~ U[0, 1) in training; VPSDE(beta_min=0.1, beta_max=20).
        return ({"convention": "continuous", "min": 0.0, "max": 999.0, "scale": 999.0},
                {"type": "vp_continuous", "beta_min": 0.1, "beta_max": 20.0, "model_time_scale": 999.0})
    # train_ldm_discrete.py: n in {1..1000} uses betas[n-1]; diffusers timestep = n - 1.
    return ({"convention": "discrete", "min": 1.0, "max": 1000.0, "scale": 1000.0, "offset": 1},
            {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "model_time_offset": 1})


def _t2i_spec(official: dict, extra: dict) -> ModelSpec:
    """The text-to-image export takes ``context`` (CLIP text embeddings) instead of ``y``. It is
    declared as a feature input: fed as is at every step (N(0, 1) draws in the export checks)."""
    cfg = {**T2I_DEFAULTS, **official}
    size, chans = cfg["img_size"], cfg["in_chans"]
    time, schedule = _time_and_schedule(extra["timesteps"])
    context = {"dtype": "float32", "shape": ["batch", cfg["num_clip_token"], cfg["clip_dim"]]}
    notes = {"context": "CLIP text encoder last_hidden_state (U-ViT's FrozenCLIPEmbedder: "
                        "openai/clip-vit-large-patch14, padded/truncated to num_clip_token)"}
    if extra["cfg"]:
        notes["guidance"] = "eps_cond + scale * (eps_cond - eps_null), eps_null at the empty prompt's context"
        if extra["cfg_scale"] is not None:
            notes["cfg_scale"] = float(extra["cfg_scale"])
    return ModelSpec(sample_shape=(chans, size, size), outputs=("eps",), prediction="epsilon",
                     time=time, schedule=schedule, space="latent" if chans == 4 else "pixel",
                     extra=notes, features={CONTEXT: context})


def spec(config: dict) -> ModelSpec:
    official, extra = _split(config)
    if is_t2i(config):
        return _t2i_spec(official, extra)
    cfg = {**OFFICIAL_DEFAULTS, **official}
    size, chans, classes = cfg["img_size"], cfg["in_chans"], cfg["num_classes"]
    time, schedule = _time_and_schedule(extra["timesteps"])
    notes = {"guidance": "eps_cond + scale * (eps_cond - eps_null)"} if extra["cfg"] else {}
    if extra["cfg"] and extra["cfg_scale"] is not None:
        notes["cfg_scale"] = float(extra["cfg_scale"])
    if classes <= 0:
        num_classes, null = None, None
    elif extra["cfg"]:
        num_classes, null = classes - 1, classes - 1               # last embedding row is "no class"
    else:
        num_classes, null = classes, None                          # e.g. ImageNet-64: 1000 labels, no null
    return ModelSpec(sample_shape=(chans, size, size), outputs=("eps",), prediction="epsilon",
                     time=time, schedule=schedule, num_classes=num_classes, null_label=null,
                     space="latent" if chans == 4 else "pixel", extra=notes)


def _official(module: nn.Module) -> nn.Module:
    return module.net if isinstance(module, UViTDenoiser) else module


_LATENT_256 = dict(img_size=32, patch_size=2, in_chans=4, num_heads=16, mlp_ratio=4, qkv_bias=False,
                   mlp_time_embed=False, num_classes=1001, cfg=True)
_LATENT_512 = {**_LATENT_256, "img_size": 64, "patch_size": 4}
_IMAGENET64 = dict(img_size=64, patch_size=4, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1000)
_SMALL = dict(patch_size=2, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4, qkv_bias=False,
              mlp_time_embed=False, num_classes=-1)
_MSCOCO = dict(img_size=32, in_chans=4, patch_size=2, embed_dim=512, num_heads=8, mlp_ratio=4, qkv_bias=False,
               mlp_time_embed=False, clip_dim=768, num_clip_token=77, timesteps="discrete", cfg=True, cfg_scale=1.0)

# Names are the upstream config files (README); values copied from configs/*.py "nnet" dicts.
CONFIGS: dict[str, dict] = {
    "cifar10_uvit_small": {**_SMALL, "img_size": 32},
    "celeba64_uvit_small": {**_SMALL, "img_size": 64, "patch_size": 4},
    "imagenet64_uvit_mid": {**_IMAGENET64, "embed_dim": 768, "depth": 16, "num_heads": 12},
    "imagenet64_uvit_large": {**_IMAGENET64, "embed_dim": 1024, "depth": 20, "num_heads": 16},
    "imagenet256_uvit_large": {**_LATENT_256, "embed_dim": 1024, "depth": 20, "cfg_scale": 0.4},
    "imagenet256_uvit_huge": {**_LATENT_256, "embed_dim": 1152, "depth": 28, "conv": False,
                              "timesteps": "discrete", "cfg_scale": 0.4},
    "imagenet512_uvit_large": {**_LATENT_512, "embed_dim": 1024, "depth": 20, "cfg_scale": 0.7},
    "imagenet512_uvit_huge": {**_LATENT_512, "embed_dim": 1152, "depth": 28, "conv": False,
                              "timesteps": "discrete", "cfg_scale": 0.7},
    # libs/uvit_t2i.py on MS-COCO 256 latents (configs/mscoco_uvit_small.py; train_t2i_discrete.py,
    # sample.scale 1). The Deep model is the same config with --config.nnet.depth=16 (README).
    "mscoco_uvit_small": {**_MSCOCO, "depth": 12},
    "mscoco_uvit_small_deep": {**_MSCOCO, "depth": 16},
    # Test fixture: exercises the non-default options (MLP time embedding, qkv bias, CFG null).
    "tiny": dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2,
                 qkv_bias=True, mlp_time_embed=True, num_classes=11, cfg=True),
    # Text-to-image test fixture: 5 text tokens of width 12, MLP time embedding, qkv bias.
    "tiny_t2i": dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2,
                     qkv_bias=True, mlp_time_embed=True, clip_dim=12, num_clip_token=5, timesteps="discrete"),
}

FAMILY = Family(
    name="uvit",
    build=build,
    spec=spec,
    configs=CONFIGS,
    fixture="tiny",
    official=_official,
    description="U-ViT (baofff/U-ViT): ViT with time/class/patch tokens and long skips; VP-SDE "
                "models take t*999, the *_huge latent and mscoco text-to-image models discrete steps "
                "1..1000; t2i configs (clip_dim) take a CLIP context input",
)
