"""Guards of a generation run: model outputs that are not finite, samples that diverge, and
requests that cannot fit in memory stop the run with one line instead of writing black or
saturated images (or dying in a MemoryError).

The per-call checks cost a pass over the reduced batch's arrays, small beside a model call.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from .backends.base import NonFiniteOutput
from .errors import EdgediffError, InvalidInput

# |x_t| beyond this many times the initial noise scale means the sampler diverged: a healthy
# trajectory stays within a few noise scales (pixel models in [-1, 1] plus noise).
DIVERGED = 1e4


class NonFinite(EdgediffError):
    """A model output or the sample became NaN/inf (or diverged) during generation."""


def _bad(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(np.isfinite(a)))


class FiniteChecked:
    """``denoise(x, t, **kw) -> dict`` that refuses a non-finite or diverged ``x`` before the
    call and non-finite outputs after it, naming the step, t and output. ``steps`` and
    ``calls`` (model calls per run) turn the call count into a sampler step; ``hint`` says
    what the run was asked for (guidance) so the message can point at the likely cause."""

    def __init__(self, denoise, steps: int, calls: int, scale: float, hint: str = ""):
        self.denoise, self.steps, self.calls, self.hint = denoise, steps, max(calls, 1), hint
        self.limit = DIVERGED * max(1.0, float(scale))
        self.count = 0

    def _where(self, t) -> str:
        step = min(self.steps, self.count * self.steps // self.calls + 1)
        t_value = float(np.ravel(np.asarray(t, dtype=np.float64))[0])
        return f"step {step}/{self.steps} (t = {t_value:g})"

    def __call__(self, x, t, **kw):
        peak = float(np.abs(x).max(initial=0.0))     # one pass per step: NaN propagates, inf exceeds
        if not peak <= self.limit:
            bad = _bad(x)
            what = f"{bad} NaN/inf values" if bad else f"|x| up to {peak:.3g}"
            raise NonFinite(f"the sample diverged before {self._where(t)} ({what}){self.hint}; "
                            "lower the guidance scales, or pass --allow-nonfinite to keep going")
        try:
            out = self.denoise(x, t, **kw)
        except NonFiniteOutput as exc:          # the backend's own check, on the raw outputs
            raise self._broken(exc.output, exc.bad, exc.size, t, "") from None
        for name, value in out.items():         # after guidance: a huge w can overflow alone
            bad = _bad(value)
            if bad:
                raise self._broken(name, bad, value.size, t, self.hint)
        self.count += 1
        return out

    def _broken(self, name: str, bad: int, size: int, t, hint: str) -> NonFinite:
        cause = "lower the guidance scales" if hint else "the bundle's weights or inputs are broken (re-export it)"
        return NonFinite(f"the model's output {name!r} is not finite at {self._where(t)}: {bad} of {size} values "
                         f"NaN/inf{hint}; {cause}, or pass --allow-nonfinite to keep going")


@contextlib.contextmanager
def finite_checks(backends, enabled: bool):
    """Turn the backends' own NaN/inf output checks on or off for a run, then restore them."""
    saved = [(b, b.check_finite) for b in backends if b is not None and hasattr(b, "check_finite")]
    for b, _ in saved:
        b.check_finite = enabled
    try:
        yield
    finally:
        for b, before in saved:
            b.check_finite = before


def check_samples(samples: np.ndarray, what: str = "the samples") -> None:
    """Refuse non-finite final samples (a sampler's last update can overflow on its own)."""
    bad = _bad(samples)
    if bad:
        raise NonFinite(f"{what} are not finite ({bad} of {samples.size} values NaN/inf); "
                        "pass --allow-nonfinite to write them anyway")


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PB"


def check_memory(n: int, batch: int, sample_shape, image_shape=None, guided: bool = False,
                 available: int | None = None) -> int:
    """Refuse a run whose arrays cannot fit: the n float32 samples (+ their uint8 images) kept
    for the output, and a batch's working set (x, noise and a few model-sized outputs, doubled
    when guided). Returns the estimate in bytes."""
    per_sample = 4 * int(np.prod(sample_shape))
    per_image = int(np.prod(image_shape)) if image_shape is not None else per_sample // 4
    kept = n * (per_sample + per_image)
    working = min(batch, n) * per_sample * (2 if guided else 1) * 8
    need = kept + working
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise InvalidInput(f"{n} samples at batch {batch} need about {_human(need)} of memory "
                           f"({_human(kept)} for the results), more than the {_human(available)} available: "
                           "lower -n (draw the rest later with --first) or --batch")
    return need
