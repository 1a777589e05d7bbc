"""Calibration feeds for INT8: the inputs the denoiser really sees along its sampling
trajectories, step by step.

A diffusion model's activation ranges move with t (Q-Diffusion, Li et al. 2023, Sec. 4.1:
calibrating on one step or on random t breaks samples), so the feeds are *timestep-aware*:
the bundle's FP32 ONNX model is run under its recommended sampler for ``samples`` draws (every
class in turn for a conditional model), and the exact feeds of every model call are recorded —
after guidance has stacked its [conditional | null] halves, so null labels and the empty
prompt's context are calibrated too. Each step keeps at most ``cap`` rows, a seeded uniform
choice (reservoir sampling), so every t is represented equally however many samples are drawn.

Torch-free: it needs only the runtime (ONNX Runtime). The result is a reusable ``.npz``:
one array per model input (rows of all steps stacked), ``step`` (the row's sampler step,
0 = the noisiest) and the settings that produced it (``meta``, JSON).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.pipeline import resolve_settings


@dataclass
class CalibrationFeeds:
    """Recorded model inputs: ``arrays[name]`` (M, ...) and ``step`` (M,), step-major."""

    arrays: dict[str, np.ndarray]
    step: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.step)

    def batches(self, size: int):
        """Feed dicts of ``size`` rows (the last may be smaller), step-major order."""
        for start in range(0, len(self), size):
            yield {k: np.ascontiguousarray(v[start:start + size]) for k, v in self.arrays.items()}

    def select(self, rows: np.ndarray) -> "CalibrationFeeds":
        """The rows picked by a boolean mask, in order."""
        return CalibrationFeeds({k: v[rows] for k, v in self.arrays.items()}, self.step[rows],
                                {**self.meta, "rows": int(np.count_nonzero(rows))})

    def by_step(self):
        """(step, feed of all its rows) for each recorded step, in order."""
        for k in np.unique(self.step):
            yield int(k), self.select(self.step == k).arrays

    def save(self, path: str | Path) -> Path:
        """Write the feeds to ``path`` (.npz) atomically."""
        from edgediff.runtime.images import save_npz

        save_npz(path, **self.arrays, step=self.step, meta=np.array(json.dumps(self.meta)))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, inputs: list[str] | None = None) -> "CalibrationFeeds":
        """Read feeds written by :meth:`save`; ``inputs``: the model inputs they must hold."""
        from edgediff.runtime.conditions import read_npz_arrays

        arrays = read_npz_arrays(Path(path), "step", None)
        names = [k for k in arrays if k not in ("step", "meta")]
        missing = sorted(set(inputs or []) - set(names))
        if missing:
            raise InvalidInput(f"{path} lacks calibration input(s) {missing} (has: {', '.join(names) or 'none'})")
        step = arrays.pop("step")
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        if any(len(v) != len(step) for v in arrays.values()):
            raise InvalidInput(f"{path}: calibration arrays disagree in length")
        return cls(arrays, step, meta)


class Recorder:
    """A backend wrapper that keeps, per distinct t (one sampler step), a seeded uniform
    choice of at most ``cap`` of the rows it was fed (reservoir sampling: Vitter's algorithm R)."""

    def __init__(self, backend, cap: int, seed: int):
        self.backend, self.cap = backend, cap
        self.rng = np.random.default_rng(seed)
        self.kept: dict[float, list] = {}       # t -> rows (dicts of 1-row arrays), insertion = step order
        self.seen: dict[float, int] = {}

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for i in range(len(feed["x"])):
            t = float(feed["t"][i])
            rows, seen = self.kept.setdefault(t, []), self.seen.get(t, 0)
            row = {k: np.array(v[i]) for k, v in feed.items()}
            if seen < self.cap:
                rows.append(row)
            else:
                j = int(self.rng.integers(0, seen + 1))
                if j < self.cap:
                    rows[j] = row
            self.seen[t] = seen + 1
        return self.backend.infer(feed)

    def feeds(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if not self.kept:
            raise InvalidInput("nothing was recorded: the sampler made no model call")
        rows = [r for ts in self.kept.values() for r in ts]
        step = np.concatenate([np.full(len(ts), k, np.int64) for k, ts in enumerate(self.kept.values())])
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}, step

    def __getattr__(self, name):          # everything else (close, check_finite ...) is the backend's
        return getattr(self.backend, name)


def record_feeds(pipe, samples: int = 64, cap: int = 64, seed: int = 0, sampler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, batch: int = 16, progress=None,
                 **conditions) -> CalibrationFeeds:
    """Sample ``samples`` draws through ``pipe`` (an FP32 :class:`~edgediff.runtime.pipeline.Pipeline`)
    with its recommended settings (or those given) and return the recorded feeds, at most
    ``cap`` rows per step. ``conditions``: what the bundle needs besides labels (``prompt=``
    texts for a text-to-image bundle, ``cond=`` images for an image-conditioned one; then
    ``samples`` is per condition)."""
    for name, value in (("samples", samples), ("cap", cap), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
    recorder = Recorder(pipe.backend, cap, seed)
    inner, pipe.backend = pipe.backend, recorder
    try:
        pipe(samples, seed=seed, sampler=sampler, steps=steps, guidance=guidance, batch=batch, progress=progress,
             **conditions)
    finally:
        pipe.backend = inner
    arrays, step = recorder.feeds()
    s = resolve_settings(pipe.manifest, sampler, steps, guidance)
    meta = {"bundle": str(pipe.bundle.path), "source_sha256": pipe.manifest.source_sha256, "samples": samples,
            "cap": cap, "seed": seed, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
            "rows": int(len(step)), "steps_recorded": int(step.max() + 1)}
    return CalibrationFeeds(arrays, step, meta)
