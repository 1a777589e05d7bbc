"""NumPy samplers: a registry (``SAMPLERS``) and one entry point (``sample``).

    from edgediff.runtime import Schedule, SAMPLERS, sample
    sched = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                  "beta_start": 1e-4, "beta_end": 0.02})
    x0 = sample("ddim", denoise, x_T, sched, steps=50, noise=np.random.default_rng(0))

``denoise(x, t)`` takes NumPy arrays (``t``: float32 [B] in the model's time convention:
integer steps for discrete schedules, ``999·t`` for U-ViT's VP SDE, ``t`` for DDM) and
returns ``eps`` as an ndarray, or a dict of named outputs: ``{"eps", "var"}`` for DiT's
learned sigma (``ddpm`` with ``variance="learned_range"``), ``{"c", "eps"}`` for the
decoupled model (``ddm``), ``{"x0"}`` / ``{"v"}`` for x0- / v-prediction models (every VP
sampler, through ``solvers.predict``); tuples are read in that order. Guidance belongs in
``denoise``; samplers only call it.

Randomness enters only through ``noise``: a ``np.random.Generator`` (drawn in step order,
at the steps that add noise) or a callable ``noise(i, shape)`` giving step ``i``'s noise,
so a trajectory can be replayed against a reference. ``callback(info)`` is called after
every sampler step with ``{"i", "total", "t", "x", "denoised"}`` (k-diffusion style).
The caller draws and scales ``x_T``; :func:`init_noise_sigma` gives the scale. Every
sampler is a :class:`Sampler` record in ``SAMPLERS`` (function, schedule kinds, whether it
draws noise, how x_T is scaled, how many model calls it makes); adding a sampler is one
function plus one record. :func:`sampler_table` renders the records for the README.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .schedules import SCHEDULE_KINDS, Schedule, spaced_timesteps
from .sampler_ddm import ddm_model_calls, sample_ddm
from .solvers import (call, noise_source, outputs, predict, report, sample_dpm_solver,
                      sample_dpmpp_2m, sample_euler, sample_heun, sigma_grid)
from .errors import InvalidInput

__all__ = ["SAMPLERS", "DEFAULT_SAMPLER", "Sampler", "sample", "init_noise_sigma", "model_calls",
           "sampler_table", "get_sampler", "sample_ddpm", "sample_ddim", "sample_ddm",
           "sample_euler_maruyama", "sample_dpmpp_2m", "sample_euler", "sample_heun", "sample_dpm_solver"]

def _clip(x0, clip_sample, clip_sample_range):
    return np.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def _var_of(out, x):
    """The variance-interpolation output of a learned-sigma model (dict, tuple or eps|var)."""
    if isinstance(out, dict) and "eps" not in out:
        return outputs(out, x, ("var",))[0]
    return outputs(out, x, ("eps", "var"))[1]


# --- DDPM ------------------------------------------------------------------------------
def sample_ddpm(denoise, x, schedule: Schedule, steps: int, noise=None, *,
                variance="fixed_small", clip_sample=True, clip_sample_range=1.0,
                timestep_spacing="leading", steps_offset=0, callback=None):
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2) on a respaced timestep subsequence.

    As diffusers' DDPMScheduler: each step goes to the next timestep of the subsequence
    with betas recomputed from alphas_cumprod (Nichol & Dhariwal 2021 respacing, as DiT's
    respace.py), noise is added while t > 0. ``variance``: "fixed_small" (posterior
    variance), "fixed_large" (beta_t) or "learned_range" (Nichol & Dhariwal 2021 Eq. 15:
    log var = frac·log beta_t + (1 - frac)·log posterior var, frac = (var + 1)/2, with ``var``
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
    for i, t in enumerate(ts):
        raw = call(denoise, x, schedule.model_time(t))
        eps, x0 = predict(raw, x, float(np.sqrt(a_t[i])), float(np.sqrt(1.0 - a_t[i])))
        if x0 is None:
            x0 = float(c_x0[0][i]) * x - float(c_x0[1][i]) * eps
        x0 = _clip(x0, clip_sample, clip_sample_range)
        x_new = float(c_mean[0][i]) * x0 + float(c_mean[1][i]) * x
        if t > 0:
            z = draw(i, x.shape)
            if variance == "learned_range":
                frac = (_var_of(raw, x) + 1.0) * 0.5
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
    # lucidrains' grid steps to the next grid point; diffusers' always to t - N // steps
    prev = np.append(ts[1:], -1) if timestep_spacing == "lucid" else ts - n_train // steps
    a_t = ac[ts]
    a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0 if set_alpha_to_one else ac[0])
    std = eta * np.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
    c_dir = np.sqrt(np.maximum(1.0 - a_p - std**2, 0.0))
    sa_t, sb_t, sa_p = np.sqrt(a_t), np.sqrt(1.0 - a_t), np.sqrt(a_p)
    draw = noise_source(noise, x.dtype)
    for i, t in enumerate(ts):
        eps, x0 = predict(call(denoise, x, schedule.model_time(t)), x, float(sa_t[i]), float(sb_t[i]))
        if x0 is None:
            x0 = (x - float(sb_t[i]) * eps) / float(sa_t[i])
        x0 = _clip(x0, clip_sample, clip_sample_range)
        if use_clipped_model_output:  # Glide: re-derive eps from the clipped x0
            eps = (x - float(sa_t[i]) * x0) / float(sb_t[i])
        x = float(sa_p[i]) * x0 + float(c_dir[i]) * eps
        if eta > 0:
            x = x + float(std[i]) * draw(i, x.shape)
        report(callback, i, len(ts), schedule.model_time(t), x, x0)
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
    alpha = schedule.alpha_sigma(t)[0]
    for i in range(steps):
        e = predict(call(denoise, x, schedule.model_time(t[i])), x, float(alpha[i]), float(sigma[i]))[0]
        x = float(c_x[i]) * x + float(c_eps[i]) * e
        if std[i] > 0:
            x = x + float(std[i]) * draw(i, x.shape)
        report(callback, i, steps, schedule.model_time(t[i]), x)
    return x


# --- registry ------------------------------------------------------------------------------
def _unit_sigma(schedule: Schedule, steps: int, opts: dict) -> float:
    return 1.0


def _karras_like_sigma(schedule: Schedule, steps: int, opts: dict) -> float:
    """diffusers' rule for Euler/Heun: the largest VE sigma of the grid for linspace/trailing
    spacing, sqrt(sigma_max² + 1) for leading."""
    spacing = opts.get("timestep_spacing", "linspace")
    _, sig = sigma_grid(schedule, int(steps), spacing, opts.get("steps_offset", 0))
    sigma_max = float(np.float32(sig.max()))
    return sigma_max if spacing in ("linspace", "trailing") else float(np.sqrt(sigma_max**2 + 1.0))


@dataclass(frozen=True)
class Sampler:
    """One sampler: its function and the facts the pipeline, the CLI and the docs need."""

    name: str
    fn: Callable
    schedules: tuple[str, ...]                       # schedule kinds it can drive
    stochastic: bool                                 # draws noise during sampling
    x_T: str                                         # how x_T is scaled (docs)
    model_input: str                                 # what the model is called with (docs)
    matches: str                                     # the reference it reproduces (docs)
    model_calls: Callable[[int, dict], int] = lambda steps, opts: steps
    init_sigma: Callable[[Schedule, int, dict], float] = _unit_sigma

    @functools.cached_property
    def params(self) -> frozenset:
        """The keyword options the function accepts (read once from its signature)."""
        return frozenset(inspect.signature(self.fn).parameters)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddpm", sample_ddpm, ("discrete",), True, "`z`", "`x_t`, integer step `t`",
            "diffusers DDPMScheduler; DiT p_sample_loop (learned_range)"),
    Sampler("ddim", sample_ddim, ("discrete",), False, "`z`", "`x_t`, integer step `t`",
            "diffusers DDIMScheduler (eta > 0 draws noise)"),
    Sampler("dpmpp_2m", sample_dpmpp_2m, ("discrete",), False, "`z`", "`x_t`, integer step `t`",
            "diffusers DPMSolverMultistepScheduler"),
    Sampler("euler", sample_euler, ("discrete",), False,
            "`sigma_max·z` (linspace, trailing) or `sqrt(sigma_max²+1)·z` (leading)",
            "`x/sqrt(sigma²+1)`, float step `t`", "diffusers EulerDiscreteScheduler",
            init_sigma=_karras_like_sigma),
    Sampler("heun", sample_heun, ("discrete",), False, "as `euler`", "`x/sqrt(sigma²+1)`, float step `t`",
            "diffusers HeunDiscreteScheduler", model_calls=lambda steps, opts: 2 * steps - 1,
            init_sigma=_karras_like_sigma),
    Sampler("dpm_solver", sample_dpm_solver, ("vp_continuous", "discrete"), False, "`z`",
            "`x_t`, `999·t` (VP SDE) or `t·N - 1 + offset`", "U-ViT eval.py / eval_ldm_discrete.py"),
    Sampler("euler_maruyama", sample_euler_maruyama, ("vp_continuous",), True, "`z`", "`x_t`, `999·t`",
            "U-ViT sde.euler_maruyama (CIFAR-10 config)"),
    Sampler("ddm", sample_ddm, ("ddm_constant",), True, "`sigma_max·z` (x_1 = x0 + c + eps with c = -x0; sigma_max = 1)",
            "`x_t`, `t` in (0, 1]", "DDM-Public ddm_const.py sample_fn / sample_fn_2order / LatentDiffusion",
            model_calls=lambda steps, opts: ddm_model_calls(steps, opts.get("order", 1),
                                                            opts.get("denoise_last", True)),
            init_sigma=lambda schedule, steps, opts: schedule.t_max),      # DDM's sigma_max
)}
# The usual sampler of each schedule kind (declared by the kind; what `generate` uses when
# neither the user nor the bundle names one).
DEFAULT_SAMPLER = {kind: cls.default_sampler for kind, cls in SCHEDULE_KINDS.items()}


def sampler_table() -> str:
    """The Markdown table of samplers (the README carries it; a test keeps them equal)."""
    rows = ["| sampler | schedule | stochastic | x_T (z ~ N(0, I)) | the model is called with | matches |",
            "|---|---|---|---|---|---|"]
    for s in SAMPLERS.values():
        rows.append(f"| `{s.name}` | {', '.join(s.schedules)} | {'yes' if s.stochastic else 'no'} | "
                    f"{s.x_T} | {s.model_input} | {s.matches} |")
    return "\n".join(rows) + "\n"


def get_sampler(name: str, schedule: Schedule | None = None) -> Sampler:
    """The record of sampler ``name``; with ``schedule``, check that it can drive it."""
    if name not in SAMPLERS:
        raise InvalidInput(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    record = SAMPLERS[name]
    if schedule is not None and schedule.kind not in record.schedules:
        usable = [n for n, s in SAMPLERS.items() if schedule.kind in s.schedules]
        raise InvalidInput(f"sampler {name!r} cannot drive this bundle's {schedule.kind} schedule; "
                           f"use one of {', '.join(usable)}")
    return record


def sampler_options(name: str, schedule: Schedule, options: dict) -> dict:
    """Schedule-config defaults the sampler accepts, overridden by explicit options."""
    params = get_sampler(name).params
    merged = {k: v for k, v in schedule.sampler_defaults.items() if k in params}
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
    record = get_sampler(name)
    merged = sampler_options(name, schedule, options)
    return record.fn(denoise, x, schedule, int(steps), noise, callback=callback, **merged)


def init_noise_sigma(name: str, schedule: Schedule, steps: int, **options) -> float:
    """Scale for x_T = scale·N(0, I), the convention ``sample(name, ...)`` expects."""
    return get_sampler(name).init_sigma(schedule, steps, sampler_options(name, schedule, options))


def model_calls(name: str, schedule: Schedule, steps: int, **options) -> int:
    """How many times ``sample(name, ...)`` calls the denoiser (progress bars)."""
    return get_sampler(name).model_calls(int(steps), sampler_options(name, schedule, options))
