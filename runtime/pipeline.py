"""The generation loop: a bundle's backend under a NumPy sampler, with guidance.

Classifier-free guidance is done here, never in the graph: the conditional and null-label
halves go through the backend in one batched call and ε = ε_u + w·(ε_c − ε_u).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from .samplers import SAMPLERS, init_noise_sigma, sample
from .schedules import Schedule
from .errors import InvalidInput

# Outputs that are predictions linear in the model's guess, hence guided; others (DiT's
# variance interpolation `v`) are taken from the conditional half.
GUIDED_OUTPUTS = ("eps", "c")
DEFAULT_SAMPLER = {"discrete": "dpmpp_2m", "vp_continuous": "dpm_solver", "ddm_constant": "ddm"}


class GuidedDenoiser:
    """``denoise(x, t) -> dict`` over a backend, with labels and optional guidance."""

    def __init__(self, backend, manifest: dict, labels: np.ndarray | None = None, guidance: float = 1.0):
        self.backend = backend
        self.conditional = "y" in manifest["inputs"]
        self.null = manifest.get("null_label")
        if self.conditional and labels is None:
            labels = np.full(1, self.null if self.null is not None else 0, dtype=np.int64)
        if guidance != 1.0 and (not self.conditional or self.null is None):
            raise InvalidInput("guidance needs a class-conditional model with a null label")
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.guidance = float(guidance)

    def __call__(self, x: np.ndarray, t) -> dict[str, np.ndarray]:
        n = x.shape[0]
        t = np.broadcast_to(np.asarray(t, dtype=np.float32), (n,))
        if not self.conditional:
            return self.backend.infer({"x": x, "t": np.ascontiguousarray(t)})
        y = np.broadcast_to(self.labels, (n,))
        if self.guidance == 1.0:
            return self.backend.infer({"x": x, "t": np.ascontiguousarray(t), "y": np.ascontiguousarray(y)})
        out = self.backend.infer({"x": np.concatenate([x, x]), "t": np.concatenate([t, t]),
                                  "y": np.concatenate([y, np.full(n, self.null, dtype=np.int64)])})
        w = np.float32(self.guidance)
        return {k: (v[n:] + w * (v[:n] - v[n:]) if k in GUIDED_OUTPUTS else v[:n]) for k, v in out.items()}


@dataclass
class Generation:
    samples: np.ndarray            # (N, C, H, W) float32 in the model's data space
    labels: np.ndarray | None      # (N,) int64


def sampler_options(manifest: dict, sampler: str) -> dict:
    """Per-bundle sampler defaults: DiT's learned variance for ddpm, no clipping of latents."""
    params = inspect.signature(SAMPLERS[sampler]).parameters
    extra = manifest.get("extra", {})
    wanted = {"variance": extra.get("variance"),
              "clip_sample": extra.get("clip_sample", manifest.get("space") == "pixel")}
    return {k: v for k, v in wanted.items() if k in params and v is not None}


def generate(backend, manifest: dict, n: int, *, sampler: str | None = None, steps: int = 20,
             batch: int = 16, labels: np.ndarray | None = None, guidance: float = 1.0, seed: int = 0,
             progress=None, **options) -> Generation:
    """Sample ``n`` images batch by batch; the same seed gives the same samples."""
    schedule = Schedule.from_config(manifest["schedule"])
    sampler = sampler or DEFAULT_SAMPLER[schedule.kind]
    opts = {**sampler_options(manifest, sampler), **options}
    scale = init_noise_sigma(sampler, schedule, steps, **opts)
    rng = np.random.default_rng(seed)
    shape = tuple(manifest["sample_shape"])
    chunks = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        batch_labels = None if labels is None else labels[start:start + size]
        denoise = GuidedDenoiser(backend, manifest, batch_labels, guidance)
        x_T = (scale * rng.standard_normal((size, *shape))).astype(np.float32)
        chunks.append(sample(sampler, denoise, x_T, schedule, steps, noise=rng, callback=progress, **opts))
    return Generation(np.concatenate(chunks), labels)


def resolve_labels(manifest: dict, n: int, classes: list[int] | None) -> np.ndarray | None:
    """Labels for ``n`` samples: the given classes cycled, or every class in turn."""
    if "y" not in manifest["inputs"]:
        if classes:
            raise InvalidInput("this bundle's model is unconditional: drop --class/--classes")
        return None
    k = manifest["num_classes"]
    classes = list(classes) if classes else list(range(k))
    bad = [c for c in classes if not 0 <= c < k]
    if bad:
        raise InvalidInput(f"class label(s) {bad} out of range: the model has classes 0..{k - 1}")
    return np.resize(np.asarray(classes, dtype=np.int64), n)
