"""NumPy samplers: a registry (``SAMPLERS``) and one entry point (``sample``).

    from edgediff.runtime import Schedule, SAMPLERS, sample
    sched = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                  "beta_start": 1e-4, "beta_end": 0.02})
    x0 = sample("ddim", denoise, x_T, sched, steps=50, noise=np.random.default_rng(0))

``denoise(x, t)`` takes NumPy arrays (``t``: float32 [B] in the model's time convention:
integer steps for discrete schedules, ``999·t`` for U-ViT's VP SDE, ``t`` for DDM) and
returns ``eps`` as an ndarray, or a dict of named outputs: ``{"eps", "v"}`` for DiT's
learned sigma (``ddpm`` with ``variance="learned_range"``), ``{"c", "eps"}`` for the
decoupled model (``ddm``); tuples are read in that order. Guidance belongs in
``denoise``; samplers only call it.

Randomness enters only through ``noise``: a ``np.random.Generator`` (drawn in step order,
at the steps that add noise) or a callable ``noise(i, shape)`` giving step ``i``'s noise,
so a trajectory can be replayed against a reference. ``callback(info)`` is called after
every sampler step with ``{"i", "total", "t", "x", "denoised"}`` (k-diffusion style).
The caller draws and scales ``x_T``; :func:`init_noise_sigma` gives the scale:
"""

from __future__ import annotations

import inspect

import numpy as np

from .schedules import Schedule, spaced_timesteps
from .solvers import (call, eps_of, noise_source, outputs, report, sample_dpm_solver,
                      sample_dpmpp_2m, sample_euler, sample_heun, sigma_grid)
from .errors import InvalidInput

__all__ = ["SAMPLERS", "SAMPLER_SCHEDULES", "INIT_NOISE_SIGMA_TABLE", "sample", "init_noise_sigma",
           "sample_ddpm", "sample_ddim", "sample_ddm", "sample_euler_maruyama",
           "sample_dpmpp_2m", "sample_euler", "sample_heun", "sample_dpm_solver"]

INIT_NOISE_SIGMA_TABLE = """\
| sampler | schedule | x_T (z ~ N(0, I)) | the model is called with | matches |
|---|---|---|---|---|
| `ddpm` | discrete | `z` | `x_t`, integer step `t` | diffusers DDPMScheduler; DiT p_sample_loop (learned_range) |
| `ddim` | discrete | `z` | `x_t`, integer step `t` | diffusers DDIMScheduler |
| `dpmpp_2m` | discrete | `z` | `x_t`, integer step `t` | diffusers DPMSolverMultistepScheduler |
| `euler` | discrete | `sigma_max·z` (linspace, trailing) or `sqrt(sigma_max²+1)·z` (leading) | `x/sqrt(sigma²+1)`, float step `t` | diffusers EulerDiscreteScheduler |
| `heun` | discrete | as `euler` | `x/sqrt(sigma²+1)`, float step `t` | diffusers HeunDiscreteScheduler |
| `dpm_solver` | vp_continuous, discrete | `z` | `x_t`, `999·t` (VP SDE) or `t·N - 1 + offset` | U-ViT eval.py / eval_ldm_discrete.py |
| `euler_maruyama` | vp_continuous | `z` | `x_t`, `999·t` | U-ViT sde.euler_maruyama (CIFAR-10 config) |
| `ddm` | ddm_constant | `z` (x_1 = x0 + c + eps with c = -x0) | `x_t`, `t` in (0, 1] | DDM ddm_const.py sample_fn_d / sample_fn_s |

`sigma_max` is the VE sigma `sqrt((1 - abar)/abar)` at the first sampling timestep.
"""
if __doc__:  # absent under python -OO
    __doc__ += "\n" + INIT_NOISE_SIGMA_TABLE


def _clip(x0, clip_sample, clip_sample_range):
    return np.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


# --- DDPM ------------------------------------------------------------------------------
def sample_ddpm(denoise, x, schedule: Schedule, steps: int, noise=None, *,
                variance="fixed_small", clip_sample=True, clip_sample_range=1.0,
                timestep_spacing="leading", steps_offset=0, callback=None):
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2) on a respaced timestep subsequence.

    As diffusers' DDPMScheduler: each step goes to the next timestep of the subsequence
    with betas recomputed from alphas_cumprod (Nichol & Dhariwal 2021 respacing, as DiT's
    respace.py), noise is added while t > 0. ``variance``: "fixed_small" (posterior
    variance), "fixed_large" (beta_t) or "learned_range" (Nichol & Dhariwal 2021 Eq. 15:
    log var = frac·log beta_t + (1 - frac)·log posterior var, frac = (v + 1)/2, with ``v``
    the denoiser's second output; DiT's p_mean_variance). DiT samples with
    ``clip_sample=False`` and linspace spacing (its space_timesteps). x_T ~ N(0, I).
    """
    schedule.require("discrete")
    if variance not in ("fixed_small", "fixed_large", "learned_range"):
        raise InvalidInput("variance must be fixed_small, fixed_large or learned_range, "
                         f"got {variance!r}")
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, timestep_spacing, steps_offset)
    ac = schedule.alphas_cumprod
    a_t = ac[ts]
    prev = np.append(ts[1:], -1)
    a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    beta = 1.0 - a_t / a_p
    post_var = np.maximum((1.0 - a_p) / (1.0 - a_t) * beta, 1e-20)  # diffusers' clamp
    c_x0 = (1.0 / np.sqrt(a_t), np.sqrt(1.0 - a_t) / np.sqrt(a_t))
    c_mean = (np.sqrt(a_p) * beta / (1.0 - a_t), np.sqrt(1.0 - beta) * (1.0 - a_p) / (1.0 - a_t))
    std = np.sqrt(beta if variance == "fixed_large" else post_var)
    log_beta, log_post = np.log(beta), np.log(post_var)
    draw = noise_source(noise, x.dtype)
    names = ("eps", "v") if variance == "learned_range" else ("eps",)
    for i, t in enumerate(ts):
        out = outputs(call(denoise, x, schedule.model_time(t)), x, names)
        x0 = float(c_x0[0][i]) * x - float(c_x0[1][i]) * out[0]
        x0 = _clip(x0, clip_sample, clip_sample_range)
        x_new = float(c_mean[0][i]) * x0 + float(c_mean[1][i]) * x
        if t > 0:
            z = draw(i, x.shape)
            if variance == "learned_range":
                frac = (out[1] + 1.0) * 0.5
                sd = np.exp(0.5 * (frac * float(log_beta[i]) + (1.0 - frac) * float(log_post[i])))
                x_new = x_new + sd.astype(x.dtype, copy=False) * z
            else:
                x_new = x_new + float(std[i]) * z
        x = x_new
        report(callback, i, len(ts), schedule.model_time(t), x, x0)
    return x


# --- DDIM ------------------------------------------------------------------------------
def sample_ddim(denoise, x, schedule: Schedule, steps: int, noise=None, *, eta=0.0,
                clip_sample=True, clip_sample_range=1.0, timestep_spacing="leading",
                steps_offset=0, set_alpha_to_one=True, use_clipped_model_output=False,
                callback=None):
    """DDIM (Song et al. 2021, Eq. 12 and 16): deterministic for eta = 0, DDPM-like for 1.

    As diffusers' DDIMScheduler, the previous timestep is always t - N // steps (also
    for linspace/trailing spacing), and the last step lands on alphas_cumprod = 1
    (``set_alpha_to_one``). With eta > 0 noise is drawn at every step. x_T ~ N(0, I).
    """
    schedule.require("discrete")
    n_train = schedule.num_train_timesteps
    ts = spaced_timesteps(n_train, steps, timestep_spacing, steps_offset)
    ac = schedule.alphas_cumprod
    prev = ts - n_train // steps
    a_t = ac[ts]
    a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0 if set_alpha_to_one else ac[0])
    std = eta * np.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
    c_dir = np.sqrt(np.maximum(1.0 - a_p - std**2, 0.0))
    sa_t, sb_t, sa_p = np.sqrt(a_t), np.sqrt(1.0 - a_t), np.sqrt(a_p)
    draw = noise_source(noise, x.dtype)
    for i, t in enumerate(ts):
        eps = eps_of(call(denoise, x, schedule.model_time(t)), x)
        x0 = _clip((x - float(sb_t[i]) * eps) / float(sa_t[i]), clip_sample, clip_sample_range)
        if use_clipped_model_output:  # Glide: re-derive eps from the clipped x0
            eps = (x - float(sa_t[i]) * x0) / float(sb_t[i])
        x = float(sa_p[i]) * x0 + float(c_dir[i]) * eps
        if eta > 0:
            x = x + float(std[i]) * draw(i, x.shape)
        report(callback, i, len(ts), schedule.model_time(t), x, x0)
    return x


# --- decoupled diffusion (arXiv 2306.13720) -------------------------------------------
def sample_ddm(denoise, x, schedule: Schedule, steps: int, noise=None, *, stochastic=False,
               clip_sample=True, clip_sample_range=1.0, callback=None):
    """Decoupled diffusion sampler (Huang et al. 2023, arXiv 2306.13720, Sec. 3).

    x_t = x0 + c·t + sqrt(t)·eps; the denoiser returns {"c", "eps"} at t. Grid as the
    official ddm_const.py: t_k = t_max + k/(steps-1)·(t_min - t_max), k < steps, then 0
    (t_max = sigma_max = 1, t_min = sigma_min² = 1e-4). x0 = x_t - c·t - sqrt(t)·eps
    (clipped to ±1 by default, as the pixel-space model). Deterministic (official
    default, sample_fn_d): x_next = x0 + c·t_next + sqrt(t_next)·eps. Stochastic
    (sample_fn_s): c = -x0, s = t - t_next, x_next = x_t - c·s - (s/sqrt(t))·eps
    + sqrt(s·t_next/t)·z. x_T ~ N(0, I); the model gets t in (0, 1].
    """
    schedule.require("ddm_constant")
    if steps < 2:
        raise InvalidInput("ddm needs steps >= 2 (the official grid divides by steps - 1)")
    grid = schedule.t_max + np.arange(steps) / (steps - 1) * (schedule.t_min - schedule.t_max)
    grid = np.append(grid, 0.0)
    draw = noise_source(noise, x.dtype)
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        c, eps = outputs(call(denoise, x, schedule.model_time(t)), x, ("c", "eps"))
        x0 = _clip(x - float(t) * c - float(np.sqrt(t)) * eps, clip_sample, clip_sample_range)
        if not stochastic:
            x = x0 + float(t_next) * c + float(np.sqrt(t_next)) * eps
        else:
            s = t - t_next
            x = x + float(s) * x0 - float(s / np.sqrt(t)) * eps  # c = -x0
            if t_next > 0:
                x = x + float(np.sqrt(s * t_next / t)) * draw(i, x.shape)
        report(callback, i, steps, schedule.model_time(t), x, x0)
    return x


# --- Euler-Maruyama on the VP SDE (U-ViT CIFAR-10) -------------------------------------
def sample_euler_maruyama(denoise, x, schedule: Schedule, steps: int, noise=None, *, ode=False,
                          eps=1e-3, callback=None):
    """Euler-Maruyama on the reverse VP SDE, or Euler on its probability-flow ODE
    (Song et al. 2021, Eq. 6 and 13), as U-ViT's sde.euler_maruyama.

    Times [0, linspace(eps, 1, steps)] walked backwards; score = -eps_pred/sigma_t; the
    last step (to t = 0) adds no noise. U-ViT's CIFAR-10 config samples the SDE with
    1000 steps and eps = 1e-3. x_T ~ N(0, I).
    """
    schedule.require("vp_continuous")
    times = np.append(0.0, np.linspace(eps, schedule.t_max, steps))[::-1]
    t, s = times[:-1], times[1:]
    dt = s - t  # negative
    beta = schedule.beta_t(t)
    sigma = schedule.alpha_sigma(t)[1]
    c_x = 1.0 - 0.5 * beta * dt                       # drift f(x, t) = -beta/2·x
    c_eps = (0.5 if ode else 1.0) * beta / sigma * dt  # -g²·score (·1/2 for the ODE)
    std = np.where((s > 0) & (not ode), np.sqrt(beta * -dt), 0.0)
    draw = noise_source(noise, x.dtype)
    for i in range(steps):
        e = eps_of(call(denoise, x, schedule.model_time(t[i])), x)
        x = float(c_x[i]) * x + float(c_eps[i]) * e
        if std[i] > 0:
            x = x + float(std[i]) * draw(i, x.shape)
        report(callback, i, steps, schedule.model_time(t[i]), x)
    return x


# --- registry ------------------------------------------------------------------------------
SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpm_solver": sample_dpm_solver,
    "euler_maruyama": sample_euler_maruyama,
    "ddm": sample_ddm,
}
SAMPLER_SCHEDULES = {
    "ddpm": ("discrete",), "ddim": ("discrete",), "dpmpp_2m": ("discrete",),
    "euler": ("discrete",), "heun": ("discrete",), "dpm_solver": ("discrete", "vp_continuous"),
    "euler_maruyama": ("vp_continuous",), "ddm": ("ddm_constant",),
}
_PARAMS = {name: frozenset(inspect.signature(fn).parameters) for name, fn in SAMPLERS.items()}


def _options(name, schedule: Schedule, options):
    """Schedule-config defaults the sampler accepts, overridden by explicit options."""
    if name not in SAMPLERS:
        raise InvalidInput(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    merged = {k: v for k, v in schedule.sampler_defaults.items() if k in _PARAMS[name]}
    merged.update(options)
    return merged


def sample(name: str, denoise, x_T, schedule: Schedule, steps: int, noise=None, *,
           callback=None, **options):
    """Run sampler ``name`` from ``x_T`` (already scaled, see :func:`init_noise_sigma`).

    ``options`` are the sampler's keyword options (eta, variance, timestep_spacing, ...);
    diffusers options recorded in the schedule's config are applied as defaults.
    Returns x0 in ``x_T``'s dtype.
    """
    x = np.asarray(x_T)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x_T must be a floating array, got {x.dtype}")
    merged = _options(name, schedule, options)
    return SAMPLERS[name](denoise, x, schedule, int(steps), noise, callback=callback, **merged)


def init_noise_sigma(name: str, schedule: Schedule, steps: int, **options) -> float:
    """Scale for x_T = scale·N(0, I), the convention ``sample(name, ...)`` expects.

    1 for every VP-space sampler; for ``euler``/``heun`` diffusers' rule: the largest VE
    sigma of the grid for linspace/trailing spacing, sqrt(sigma_max² + 1) for leading.
    """
    merged = _options(name, schedule, options)
    if name not in ("euler", "heun"):
        return 1.0
    spacing = merged.get("timestep_spacing", "linspace")
    _, sig = sigma_grid(schedule, int(steps), spacing, merged.get("steps_offset", 0))
    sigma_max = float(np.float32(sig.max()))
    return sigma_max if spacing in ("linspace", "trailing") else float(np.sqrt(sigma_max**2 + 1.0))
