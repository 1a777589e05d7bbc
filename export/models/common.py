"""Pieces shared by the reference models: checkpoint reading, strict loading, embeddings."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from edgediff.runtime.errors import InvalidInput

# Keys under which training scripts nest the weights, most preferred first (EMA beats raw).
_WRAPPERS = ("ema", "model_ema", "nnet_ema", "state_dict", "model", "net", "nnet", "module")


class CheckpointError(InvalidInput):
    """A checkpoint that cannot be read or does not fit the configured model."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors or a torch pickle, never unpickling arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path.name} as safetensors: {exc}") from None
    try:
        # Official DiT training checkpoints carry their argparse Namespace next to the
        # weights; allowing exactly that class keeps weights_only=True usable for them.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own text suggests weights_only=False, exactly what must not be done here
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path.name} with torch.load(weights_only=True) (.safetensors, or a "
                              f"torch state dict of tensors): {first}") from None
    return _unwrap(obj)


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """Descend into the usual wrapper dicts until a flat name -> tensor mapping is left."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    raise CheckpointError("checkpoint holds no tensors (expected a state dict, or one under "
                          f"one of the keys {', '.join(_WRAPPERS)})")


def _select_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> str:
    """Find the key prefix under which every expected name lives (EMA copies preferred)."""
    if expected <= state.keys():
        return ""
    counts: dict[str, int] = {}
    for key in state:
        for name in expected:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                prefix = key[: len(key) - len(name)]
                counts[prefix] = counts.get(prefix, 0) + 1
    full = [p for p, n in counts.items() if n == len(expected)]
    if not full:
        return max(counts, key=counts.get, default="")
    return sorted(full, key=lambda p: ("ema" not in p.lower(), len(p)))[0]


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], label: str = "model") -> None:
    """Load ``state`` into ``module``: same names, same shapes, nothing left over.

    Accepts a common prefix (``module.``, ``model.``, ``ema_model.`` ...) and ignores tensors
    outside it (e.g. a VAE stored beside the denoiser).
    """
    own = module.state_dict()
    prefix = _select_prefix(state, set(own))
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(picked))
    unexpected = sorted(set(picked) - set(own))
    shapes = [f"{k} {tuple(picked[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(picked)) if picked[k].shape != own[k].shape]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:4]) + (f", ... (+{len(items) - 4})" if len(items) > 4 else "")
            problems.append(f"{len(items)} {what}: {shown}")
    if problems:
        where = f" under prefix {prefix!r}" if prefix else ""
        raise CheckpointError(f"checkpoint does not fit the {label} config{where}: " + "; ".join(problems))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in picked.items()}, strict=True)


def timestep_frequencies(dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Frequencies of the sinusoidal timestep embedding, computed in float32 exactly as the
    official DiT/U-ViT/ADM/diffusers code does, so the traced constants are bit-identical."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32)
    return torch.exp(exponent / (half - freq_shift))


def sinusoidal_embedding(t: torch.Tensor, freqs: torch.Tensor, dim: int, cos_first: bool = True,
                         scale: float = 1.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) embedding; ``cos_first`` is diffusers' flip_sin_to_cos."""
    args = t[:, None].float() * freqs[None]                        # (N, half)
    if scale != 1.0:
        args = scale * args
    parts = (torch.cos(args), torch.sin(args)) if cos_first else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)                                 # (N, 2*half)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
