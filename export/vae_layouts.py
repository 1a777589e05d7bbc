"""Autoencoder checkpoints in their two published layouts, read into diffusers' ``AutoencoderKL``.

- diffusers: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (stabilityai/sd-vae-ft-ema,
  -mse), given as the directory or as the two files.
- CompVis latent-diffusion first stage: ``encoder.*``, ``decoder.*``, ``quant_conv.*``,
  ``post_quant_conv.*`` (``loss.*`` and everything else ignored), possibly under a prefix
  (``first_stage_model.`` in a whole LDM/DDM checkpoint), described by a ``ddconfig`` and
  ``embed_dim``. Its weights are renamed with diffusers' own ``convert_ldm_vae_checkpoint``
  and then loaded strictly, with a check that every first-stage tensor found a place.

diffusers' module is the PyTorch reference in both cases: for the layers these configs allow
(GroupNorm eps 1e-6 everywhere, one single-head attention in the mid-blocks, nearest 2x
upsampling, right/bottom zero padding before the stride-2 downsampling convolutions) it
computes what the CompVis code computes (tests/export/official_ldm_vae.py checks that).
Nothing here unpickles code: .pth/.ckpt/.bin are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgediff.runtime.errors import InvalidInput

from .models.common import CheckpointError, _select_prefix, read_checkpoint
from .models.validation import REQUIRED, Field, Schema, boolean, choice, pos_float, pos_int, rule

LAYOUTS = ("diffusers", "ldm")
DEFAULT_SCALING_FACTOR = 0.18215      # diffusers' AutoencoderKL default = LDM's KL-f8 (SD, DiT, U-ViT)
LDM_GROUPS = 32                       # CompVis Normalize(): GroupNorm(32, C, eps=1e-6)
LDM_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LDM_ANCHORS = {"encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight"}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Pre-0.14 diffusers attention names, still in the files of sd-vae-ft-ema/-mse.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_ENC, _DEC = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"), ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
NULL_ONLY = "null (shifted or per-channel normalised latents, as in SD3/FLUX/SDXL-playground VAEs, are not supported)"
DIFFUSERS_SCHEMA = Schema("AutoencoderKL", {
    "in_channels": pos_int(3), "out_channels": pos_int(3),
    "down_block_types": Field("strs", ("DownEncoderBlock2D",), nonempty=True),
    "up_block_types": Field("strs", ("UpDecoderBlock2D",), nonempty=True),
    "block_out_channels": Field("ints", (64,), lo=1, nonempty=True),
    "layers_per_block": pos_int(1), "act_fn": choice("silu", "silu", "swish", "gelu", "relu", "mish"),
    "latent_channels": pos_int(4), "norm_num_groups": pos_int(32), "sample_size": Field("size", 32, lo=1),
    "scaling_factor": pos_float(DEFAULT_SCALING_FACTOR),
    "shift_factor": Field("any", None, choices=(None,), words=NULL_ONLY),
    "latents_mean": Field("any", None, choices=(None,), words=NULL_ONLY),
    "latents_std": Field("any", None, choices=(None,), words=NULL_ONLY),
    "force_upcast": boolean(True), "use_quant_conv": boolean(True), "use_post_quant_conv": boolean(True),
    "mid_block_add_attention": boolean(True),
}, rules=(
    rule(lambda c: len(c["down_block_types"]) == len(c["up_block_types"]) == len(c["block_out_channels"]),
         "down_block_types, up_block_types and block_out_channels must have one entry per level"),
    rule(lambda c: set(c["down_block_types"]) <= set(_ENC) and set(c["up_block_types"]) <= set(_DEC),
         f"block types must be among {', '.join(_ENC + _DEC)}"),
    rule(lambda c: all(ch % c["norm_num_groups"] == 0 for ch in c["block_out_channels"]),
         "every block_out_channels entry must be divisible by norm_num_groups {norm_num_groups}"),
), metadata="_")

_FIXED = "only the value the KL autoencoders use ({}) is supported"
LDM_SCHEMA = Schema("LDM first-stage", {
    "double_z": Field("any", True, choices=(True,), words="true (a KL autoencoder's mean and log-variance)"),
    "z_channels": pos_int(), "resolution": Field("size", REQUIRED, lo=1), "in_channels": pos_int(),
    "out_ch": pos_int(), "ch": pos_int(), "ch_mult": Field("ints", REQUIRED, lo=1, nonempty=True),
    "num_res_blocks": pos_int(), "attn_resolutions": Field("any", []), "dropout": Field("number", 0.0, lo=0, hi=1),
    "resamp_with_conv": Field("any", True, choices=(True,), words=_FIXED.format("true")),
    "use_linear_attn": Field("any", False, choices=(False,), words=_FIXED.format("false")),
    "attn_type": Field("any", "vanilla", choices=("vanilla",), words=_FIXED.format("vanilla")),
    "give_pre_end": Field("any", False, choices=(False,), words=_FIXED.format("false")),
    "tanh_out": Field("any", False, choices=(False,), words=_FIXED.format("false")),
}, rules=(
    rule(lambda c: all(c["ch"] * m % LDM_GROUPS == 0 for m in c["ch_mult"]),
         f"every ch·ch_mult must be divisible by {LDM_GROUPS} (CompVis GroupNorm has {LDM_GROUPS} groups)"),
    rule(lambda c: isinstance(c["attn_resolutions"], (list, tuple)), "attn_resolutions must be a list"),
    # diffusers' AutoencoderKL (like every published KL first stage) has attention only in
    # its mid-blocks; per-level attention would have no counterpart in the reference
    rule(lambda c: not _level_attention(c), "attention at resolution(s) {attn_resolutions} inside the levels "
         "is not supported (only the mid-block attention of the KL-f4/f8 autoencoders)"),
))


def _level_attention(c: dict) -> list:
    res = c["resolution"]
    levels = [[r // 2**i for r in res] if isinstance(res, (list, tuple)) else res // 2**i
              for i in range(len(c["ch_mult"]))]
    return [r for r in levels if r in list(c["attn_resolutions"]) or
            (isinstance(r, list) and tuple(r) in [tuple(a) for a in c["attn_resolutions"] if isinstance(a, list)])]


@dataclass(frozen=True)
class VAESource:
    """A checkpoint read into diffusers' naming, with what its files say about it."""

    layout: str
    config: dict              # AutoencoderKL keyword arguments (checked)
    state: dict               # diffusers-named tensors
    weights: Path             # the file whose sha256 the bundle records
    prefix: str               # the key prefix the weights lived under
    scaling_factor: float | None    # what the files say (None: nothing)
    scaling_from: str | None        # where that came from ("config", "checkpoint")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)


# --- files and layout --------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read the {what} {path} as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"the {what} {path} must hold a JSON object")
    return data


def _diffusers_files(directory: Path) -> tuple[Path, Path]:
    """(weights, config.json) of a diffusers model folder (or of a pipeline's ``vae/``)."""
    if not (directory / "config.json").is_file() and (directory / "vae" / "config.json").is_file():
        directory = directory / "vae"
    weights = next((directory / n for n in DIFFUSERS_WEIGHTS if (directory / n).is_file()), None)
    if weights is None or not (directory / "config.json").is_file():
        raise InvalidInput(f"{directory} is not a diffusers AutoencoderKL folder: it needs config.json and "
                           f"{' or '.join(DIFFUSERS_WEIGHTS)}")
    return weights, directory / "config.json"


def weights_file(path: Path) -> Path:
    """The weights of a checkpoint given as a file or as a diffusers folder."""
    return _diffusers_files(Path(path))[0] if Path(path).is_dir() else Path(path)


def find_ldm_params(d: dict, depth: int = 4) -> dict | None:
    """The ``{ddconfig, embed_dim}`` mapping inside an LDM/DDM config (the first-stage section
    itself, ``params``, ``model.params.first_stage_config.params``, DDM's ``model.first_stage``)."""
    if "ddconfig" in d:
        return d
    if depth:
        for v in d.values():
            if isinstance(v, dict) and (found := find_ldm_params(v, depth - 1)) is not None:
                return found
    return None


def detect_layout(config: dict | None, weights: Path, keys) -> str:
    """diffusers or ldm, from the config's keys, else from the checkpoint's key names."""
    if config is not None:
        return "ldm" if find_ldm_params(config) is not None else "diffusers"
    if weights.name in DIFFUSERS_WEIGHTS:
        return "diffusers"
    if any(".down_blocks." in k or ".up_blocks." in k for k in keys):
        return "diffusers"
    if any(re.search(r"(^|\.)encoder\.down\.\d+\.block\.", k) for k in keys):
        return "ldm"
    raise InvalidInput(f"cannot tell the layout of {weights.name}: neither diffusers (encoder.down_blocks.*) "
                       "nor CompVis LDM (encoder.down.N.block.*) keys; pass --layout and --config")


def read_vae(checkpoint, config=None, layout: str | None = None, prefix: str | None = None) -> VAESource:
    """Resolve files, layout and config, and read the weights into diffusers names."""
    checkpoint = Path(checkpoint)
    if layout is not None and layout not in LAYOUTS:
        raise InvalidInput(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    cfg = _read_json(Path(config), "autoencoder config") if config is not None else None
    if checkpoint.is_dir():
        weights, found = _diffusers_files(checkpoint)
        cfg = cfg if cfg is not None else _read_json(found, "autoencoder config")
    else:
        weights = checkpoint
        sibling = checkpoint.with_name("config.json")
        if cfg is None and checkpoint.name in DIFFUSERS_WEIGHTS and sibling.is_file():
            cfg = _read_json(sibling, "autoencoder config")
    raw = read_checkpoint(weights)
    layout = layout or detect_layout(cfg, weights, raw.keys())
    if cfg is None:
        need = "a diffusers config.json" if layout == "diffusers" else "a JSON with ddconfig and embed_dim"
        raise InvalidInput(f"{weights.name} needs --config ({need})")
    if layout == "ldm":
        return _read_ldm(raw, weights, cfg, prefix)
    full = DIFFUSERS_SCHEMA.check(cfg)
    state, used = read_weights(raw, "diffusers", full, prefix, weights.name)
    return VAESource("diffusers", full, state, weights, used, full["scaling_factor"] if "scaling_factor" in cfg
                     else None, "config" if "scaling_factor" in cfg else None)


def ldm_to_diffusers_config(params: dict) -> dict:
    """AutoencoderKL keyword arguments equivalent to an LDM ``{ddconfig, embed_dim}``."""
    dd = LDM_SCHEMA.check(params.get("ddconfig"))
    embed = params.get("embed_dim")
    if embed != dd["z_channels"]:
        # diffusers has one latent width; LDM's quant_conv could map z_channels to another
        raise InvalidInput(f"embed_dim {embed!r} must equal ddconfig z_channels {dd['z_channels']} "
                           "(as in every published KL autoencoder)")
    n, res = len(dd["ch_mult"]), dd["resolution"]
    return DIFFUSERS_SCHEMA.check({
        "in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"], "norm_num_groups": LDM_GROUPS,
        "sample_size": list(res) if isinstance(res, (list, tuple)) else res})


def _read_ldm(raw: dict, weights: Path, cfg: dict, prefix: str | None) -> VAESource:
    params = find_ldm_params(cfg)
    if params is None:
        raise InvalidInput("an LDM-layout config needs a ddconfig (and embed_dim), e.g. "
                           '{"embed_dim": 4, "ddconfig": {"z_channels": 4, ...}}')
    full = ldm_to_diffusers_config(params)
    state, used = read_weights(raw, "ldm", full, prefix, weights.name)
    scale = _ldm_scale(raw, used)
    return VAESource("ldm", full, state, weights, used, scale, "checkpoint" if scale is not None else None)


def _ldm_scale(raw: dict, prefix: str) -> float | None:
    """LatentDiffusion with ``scale_by_std`` keeps its latent scale as the buffer
    ``scale_factor`` beside ``first_stage_model``: the scale its denoiser was trained with."""
    if not prefix.endswith("first_stage_model."):
        return None
    value = raw.get(prefix[: -len("first_stage_model.")] + "scale_factor")
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


# --- weights -----------------------------------------------------------------------------
def read_weights(raw: dict, layout: str, config: dict, prefix: str | None = None,
                 name: str = "the checkpoint") -> tuple[dict, str]:
    """A checkpoint's tensors in diffusers' names (not yet checked against a module), and the
    prefix they lived under."""
    if layout == "diffusers":
        if prefix:
            raw = _under(raw, prefix, name)
        return _rename_old_attention(raw), prefix or ""
    if prefix is None:
        prefix = _select_prefix(raw, LDM_ANCHORS)
    picked = _under(raw, prefix, name) if prefix else raw
    vae = {k: v for k, v in picked.items() if k.startswith(LDM_MODULES)}    # loss.*, colorize... ignored
    missing = sorted(LDM_ANCHORS - vae.keys())
    if missing:
        where = f" under prefix {prefix!r}" if prefix else ""
        raise CheckpointError(f"{name} holds no CompVis first-stage autoencoder{where}: "
                              f"missing {', '.join(missing)}")
    return convert_ldm(vae, config), prefix


def _under(raw: dict, prefix: str, name: str) -> dict:
    picked = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointError(f"{name} has no tensors under the prefix {prefix!r}")
    return picked


def _rename_old_attention(state: dict) -> dict:
    pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: f"{m.group(1)}{_OLD_ATTENTION[m.group(2)]}.", k): v for k, v in state.items()}


def convert_ldm(vae: dict, config: dict) -> dict:
    """CompVis names -> diffusers names with diffusers' ``convert_ldm_vae_checkpoint``. It
    renames what it recognises and silently drops the rest, so every tensor is counted:
    the strict load that follows then catches any misplaced one."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # the converter strips a "first_stage_model."/"vae." prefix itself; ours is already gone
    converted = convert_ldm_vae_checkpoint(dict(vae), {"down_block_types": config["down_block_types"],
                                                      "up_block_types": config["up_block_types"]})
    if len(converted) != len(vae) or any(v is None for v in converted.values()):
        raise CheckpointError(f"{len(vae) - len(converted)} of the {len(vae)} first-stage tensors have no place "
                              "in a KL autoencoder of this ddconfig (is it another first stage, e.g. a VQ one?)")
    return converted


def load_vae(weights: Path, layout: str, config: dict, prefix: str):
    """The reference again from a bundle's record (layout, AutoencoderKL config, prefix)."""
    return build_vae(config, read_weights(read_checkpoint(weights), layout, config, prefix, Path(weights).name)[0])


def build_vae(config: dict, state: dict):
    """diffusers' AutoencoderKL for ``config``, ``state`` loaded strictly, in eval mode."""
    from diffusers import AutoencoderKL

    from .models.common import load_strict

    vae = AutoencoderKL(**config)
    load_strict(vae, state, label="AutoencoderKL")
    return vae.eval()
