"""Self-conditioning (Chen et al. 2022, arXiv 2208.04202), as lucidrains'
``GaussianDiffusion`` samples it: the model gets an extra input ``x_self_cond``, its own x0
estimate from the previous call (zeros at the first), clipped to [-1, 1] as ``p_sample_loop``
and ``ddim_sample`` clip ``x_start`` before passing it on.

A wrapper around any ``denoise(x, t, **extra_inputs)`` (the pipeline's ``GuidedDenoiser``):
it keeps the one piece of state, so samplers stay pure functions of ``denoise``. Make one per
sampling run (the pipeline makes one per batch).
"""
from __future__ import annotations

import numpy as np

from .schedules import Schedule
from .solvers import predict

INPUT = "x_self_cond"


class SelfConditioned:
    """``denoise(x, t)`` feeding ``x_self_cond`` = the previous call's (clipped) x0 estimate."""

    def __init__(self, denoise, schedule: Schedule, clip: bool = True, clip_range: float = 1.0):
        schedule.require("discrete")
        self.denoise, self.schedule = denoise, schedule
        self.clip, self.clip_range = clip, clip_range
        self.previous = None

    def marginal(self, t) -> tuple[float, float]:
        """(alpha, sigma) at model time ``t`` (a step, maybe fractional as Euler's: the VE sigma
        interpolated linearly between steps, as diffusers does)."""
        s = self.schedule
        step = float(np.asarray(t, dtype=np.float64).reshape(-1)[0]) - s.model_time_offset
        sig = float(np.interp(step, np.arange(s.num_train_timesteps), s.sigmas))
        alpha = 1.0 / np.sqrt(sig * sig + 1.0)
        return float(alpha), float(sig * alpha)

    def __call__(self, x: np.ndarray, t):
        cond = np.zeros_like(x) if self.previous is None else self.previous
        out = self.denoise(x, t, **{INPUT: cond})
        eps, x0 = predict(out, x, *self.marginal(t))
        if x0 is None:
            alpha, sigma = self.marginal(t)
            x0 = (x - sigma * eps) / alpha
        self.previous = np.clip(x0, -self.clip_range, self.clip_range) if self.clip else x0
        return out
