"""The decoupled-diffusion (DDM) sampler, step for step as the official code.

Decoupled diffusion (Huang et al. 2023, "Decoupled Diffusion Models: Simultaneous Image to
Zero and Zero to Noise", arXiv 2306.13720) with the constant attenuation of
``ddm/ddm_const.py`` in GuHuangAI/DDM-Public (commit 8bf8ee23e449dc899ec974d82a251cd7b6846c94):
``x_t = x0 + c·t + sqrt(t)·eps`` with ``c = -x0``, ``t`` in ``(0, 1]``; the model returns
``(c, eps)`` at ``(x_t, t)``. Three official loops are reproduced by :func:`sample_ddm`:

* ``DDPM.sample_fn`` (``sample_type: euler``, the default through ``DDPM.sample``):
  ``order=1, clip_sample=True``;
* ``DDPM.sample_fn_2order`` (any other ``sample_type``): ``order=2``;
* ``LatentDiffusion.sample_fn`` (latent models; never second order): ``clip_sample=False``,
  with its ``scale_by_softsign`` branch as ``softsign=True``.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInput
from .schedules import Schedule
from .solvers import call, noise_source, outputs, report

__all__ = ["sample_ddm", "ddm_model_calls", "ddm_plan", "SOFTSIGN_LIMIT"]

SOFTSIGN_LIMIT = 0.987654321  # LatentDiffusion.sample_fn's clamp under scale_by_softsign


def ddm_plan(steps: int, order: int = 1, denoise_last: bool = True, eps: float = 1e-4,
             t_start: float = 1.0):
    """The official step plan, in float64: (h, t, s, sigma, correct), one entry per step.

    ``h``: the nominal step sizes. order 1: ``steps`` steps of ``1/N``; order 2: ``N//2``
    steps of ``2/N`` plus, for odd N, one of ``1 - (N//2)·(2/N)``. ``denoise_last`` splits
    the last one into ``h_last - eps`` and ``eps``. ``t``: the model-call times, ``t_0 =
    t_start``, ``t_{k+1} = t_k - s_k`` accumulated in this order as the official loop does.
    ``s``: the size actually taken, ``h`` except on the last step, which takes all the time
    left (``s = t_last``, so the walk ends at 0 exactly). ``sigma = sqrt(s·(t - s)/t)``
    (0 on the last step). ``correct``: order 2 evaluates a Heun corrector at ``t - h`` on
    the full ``2/N`` steps (official ``if s >= step``); never on the last step.
    """
    n = int(steps)
    if n < 1:
        raise InvalidInput(f"ddm needs steps >= 1, got {steps}")
    if order == 1:
        full = t_start / n
        h = [full] * n
    elif order == 2:
        full = t_start / n * 2
        h = [full] * (n // 2)
        if n % 2:
            h.append(t_start - n // 2 * full)
    else:
        raise InvalidInput(f"ddm order must be 1 or 2, got {order}")
    if denoise_last:
        if not 0 < eps < h[-1]:
            raise InvalidInput(f"eps={eps} must lie in (0, {h[-1]}) (the last step's size)")
        h = h[:-1] + [h[-1] - eps, eps]
    h = np.asarray(h, dtype=np.float64)
    k = len(h)
    t = np.empty(k)
    s = h.copy()
    cur = float(t_start)
    for i in range(k):
        t[i] = cur
        if i == k - 1:
            s[i] = cur
        cur = cur - s[i]
    sigma = np.sqrt(s * (t - s) / t)
    correct = (order == 2) & (h >= full) & (np.arange(k) < k - 1)
    return h, t, s, sigma, correct


def ddm_model_calls(steps: int, order: int = 1, denoise_last: bool = True) -> int:
    """Denoiser calls of :func:`sample_ddm`: one per step plus one per order-2 corrector.

    order 1: ``steps + denoise_last``; order 2: ``steps + denoise_last - (steps even)``.
    """
    return int(sum(1 + c for c in ddm_plan(steps, order, denoise_last)[4]))


def sample_ddm(denoise, x, schedule: Schedule, steps: int, noise=None, *, order=1,
               clip_sample=True, clip_sample_range=1.0, denoise_last=True, eps=None,
               softsign=False, callback=None):
    """Decoupled diffusion sampler (Huang et al. 2023, arXiv 2306.13720), as the official
    GuHuangAI/DDM-Public ``ddm/ddm_const.py`` ``DDPM.sample_fn`` / ``sample_fn_2order`` /
    ``LatentDiffusion.sample_fn`` (see :func:`ddm_plan` for the step sizes and times).

    ``steps`` is the official ``sampling_timesteps`` N (configs: 10); ``denoise_last``
    its ``denoise`` (True through ``sample()``), ``eps`` the config's ``eps`` (default
    ``schedule.t_min``, 1e-4). Each step, at time t with size s (nominal h), from the
    model's ``(c, eps)`` at ``(x, t)``:

        x0 = x - c·t - sqrt(t)·eps, clamped to ±clip_sample_range if clip_sample;
        c  = -x0                                  (the official "correct C")
        order 1:  x <- x + s·x0 - (s/sqrt t)·eps + sqrt(s(t-s)/t)·z
        order 2:  d = x0 - eps/sqrt(t);  x_h = x + h·d;  on full 2/N steps, a Heun
                  corrector with d' from the model at (x_h, t - h) (clamped likewise):
                  x_h = x + h·(d + d')/2;  then x <- x_h + sqrt(s(t-s)/t)·z

    ``z = noise(i, x.shape)`` is drawn at every step but the last, whose factor is 0 (the
    official code draws ``randn_like(x)`` there too and multiplies it by 0), so step i's
    draw is the official i-th ``randn_like`` after ``x_T``. The result is clamped to
    ±clip_sample_range when ``clip_sample`` (``DDPM``: the official clamps the final x
    always, and x0 per step when ``clip_x_start``, True by default). ``clip_sample=False``
    is ``LatentDiffusion.sample_fn``: no clamp at all, or with ``softsign=True``
    (``scale_by_softsign``) x0 clamped to ±0.987654321 followed by a second x0 derivation
    from ``c = -x0`` (as the official code does), and the result clamped to ±0.987654321.
    ``order=2`` clamps x0 and the result to ±1 in the official code (only
    ``clip_sample_range=1`` matches it); the official ``if s >= step`` fails for batches
    > 1 and, for even N without ``denoise_last``, fires on the last step with a corrector
    at t = 0 (1/sqrt(0)); here the last step is never corrected. Not here: the official
    ``scale_input`` (clamp range = ``scale_input``, result divided by it; unset in every
    config), ``up_scale`` interpolation of x_T, the latent unscaling (``z / scale_factor``
    or ``z / (1 - |z|)``) and decoding. The walk starts at t = 1 as the official code's
    (sigma_max only scales x_T: x_T ~ ``sigma_max``·N(0, I), which the ``ddm`` sampler
    record's ``init_sigma`` gives); the model gets t in (0, 1].
    """
    schedule.require("ddm_constant")
    if softsign and (clip_sample or order != 1):
        raise InvalidInput("softsign is LatentDiffusion.sample_fn's option: needs "
                         "clip_sample=False and order=1")
    eps = schedule.t_min if eps is None else float(eps)
    h, t, s, sigma, correct = ddm_plan(steps, order, denoise_last, eps, 1.0)
    lo, hi = ((-SOFTSIGN_LIMIT, SOFTSIGN_LIMIT) if softsign else
              (-clip_sample_range, clip_sample_range) if clip_sample else (None, None))
    draw = noise_source(noise, x.dtype)

    def model_x0(xi, ti):
        c, e = outputs(call(denoise, xi, schedule.model_time(ti)), xi, ("c", "eps"))
        x0 = xi - float(ti) * c - float(np.sqrt(ti)) * e
        if softsign:  # x0 clamped, c = -x0, then x0 derived again from that c
            x0 = xi + float(ti) * np.clip(x0, lo, hi) - float(np.sqrt(ti)) * e
        elif clip_sample:
            x0 = np.clip(x0, lo, hi)
        return x0, e

    k = len(h)
    for i in range(k):
        ti = t[i]
        x0, e = model_x0(x, ti)
        if order == 1:
            x = x + float(s[i]) * x0 - float(s[i] / np.sqrt(ti)) * e
        else:
            d = x0 - float(1.0 / np.sqrt(ti)) * e
            x_h = x + float(h[i]) * d
            if correct[i]:
                th = ti - h[i]
                x0_h, e_h = model_x0(x_h, th)
                d_h = x0_h - float(1.0 / np.sqrt(th)) * e_h
                x_h = x + float(h[i]) * (0.5 * d + 0.5 * d_h)
            x = x_h
        if i < k - 1:
            x = x + float(sigma[i]) * draw(i, x.shape)
        elif lo is not None:  # the official final clamp
            x = np.clip(x, lo, hi)
        report(callback, i, k, schedule.model_time(ti), x, x0)
    return x
