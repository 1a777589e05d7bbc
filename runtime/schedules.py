"""Noise schedules for the NumPy samplers (no torch here: this runs on edge boxes).

A :class:`Schedule` is built from the diffusers-style keys a bundle records
(``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``) and holds,
in float64, everything the samplers need: betas, alphas_cumprod, the
variance-exploding sigmas ``sqrt((1 - abar) / abar)``, the half log-SNR
``lambda = log(alpha_t / sigma_t)`` (DPM-Solver's lambda), and the map from a
sampler's native time to the model's ``t`` input.

Three kinds:

``discrete`` (default)
    DDPM-style integer steps ``0..N-1`` (DDPM U-Net, DiT; U-ViT latent models with
    ``model_time_offset: 1`` because they were trained on ``n = 1..N``). The
    continuous view used by DPM-Solver follows Lu et al. 2022 (NoiseScheduleVP
    'discrete'): knots ``t_n = (n+1)/N`` with ``log alpha`` = 0.5·cumsum(log(1-beta)),
    interpolated piecewise-linearly; continuous ``t`` maps to step ``t·N - 1``.
``vp_continuous``
    The score-SDE VP SDE (Song et al. 2021) with linear ``beta(t) = beta_min + t(beta_max
    - beta_min)``, ``t`` in ``[eps, 1]``; ``log alpha_t = -t²(b1-b0)/4 - t·b0/2``. The
    U-ViT pixel models (CIFAR-10 etc.) use beta_min 0.1, beta_max 20 and are called
    with ``t·999`` (``model_time_scale``).
``ddm_constant``
    The decoupled model of arXiv 2306.13720: ``x_t = x0 + c·t + sqrt(t)·eps`` with
    ``c = -x0``, ``t`` in ``(0, 1]``; the model gets ``t`` itself. The official
    sampler steps from ``sigma_max`` to ``sigma_min²`` and then to 0.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["Schedule", "spaced_timesteps", "SCHEDULE_KINDS", "BETA_SCHEDULES"]

SCHEDULE_KINDS = ("discrete", "vp_continuous", "ddm_constant")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# diffusers scheduler keys that become per-sampler defaults (config key -> option name).
_SAMPLER_KEYS = {
    "clip_sample": "clip_sample",
    "clip_sample_range": "clip_sample_range",
    "timestep_spacing": "timestep_spacing",
    "steps_offset": "steps_offset",
    "variance_type": "variance",
    "set_alpha_to_one": "set_alpha_to_one",
    "final_sigmas_type": "final_sigmas_type",
    "lower_order_final": "lower_order_final",
    "euler_at_final": "euler_at_final",
    "solver_order": "solver_order",
    "solver_type": "solver_type",
}
# diffusers keys we accept only at the value that keeps our maths exact.
_PINNED_KEYS = {
    "prediction_type": "epsilon",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "algorithm_type": "dpmsolver++",
}
_SCHEDULE_KEYS = {
    "type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
    "model_time_offset", "beta_min", "beta_max", "model_time_scale", "eps", "sigma_min",
    "sigma_max",
}


def _betas(schedule: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas in float64, same formulas as diffusers (which then rounds them to float32)."""
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if schedule == "scaled_linear":  # latent-diffusion schedule: linear in sqrt(beta)
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021 cosine, betas capped at 0.999
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"beta_schedule {schedule!r} is not one of {BETA_SCHEDULES}")


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading",
                     steps_offset: int = 0, *, extended: bool = False,
                     continuous: bool = False) -> np.ndarray:
    """Descending model timesteps for ``steps`` sampling steps, as diffusers' set_timesteps.

    ``spacing`` is one of linspace / leading / trailing (Lin et al. 2023, Table 2).
    ``extended`` reproduces DPMSolverMultistepScheduler (an N+1 grid whose last point is
    dropped); ``continuous`` reproduces Euler/Heun (float32 linspace, not rounded).
    """
    n = num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    m = steps + 1 if extended else steps
    if spacing == "linspace":
        if continuous:
            return np.linspace(0, n - 1, m, dtype=np.float32)[::-1].copy()
        ts = np.linspace(0, n - 1, m).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, m) * (n // m)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not linspace, leading or trailing")
    if extended and spacing != "trailing":
        ts = ts[:-1]
    return ts.astype(np.float32 if continuous else np.int64).copy()


class Schedule:
    """A noise schedule in float64; build it with :meth:`from_config`.

    Attributes (discrete kind): ``betas``, ``alphas_cumprod``, ``sigmas`` (VE sigma per
    step), ``lambdas`` (half log-SNR per step). Continuous kinds: ``t_min``/``t_max``.
    ``sampler_defaults`` holds diffusers options found in the config (clip_sample,
    timestep_spacing, ...), applied by ``sample()`` unless overridden.
    ``ignored_keys`` lists config keys that had no effect.
    """

    def __init__(self, kind: str = "discrete", *, betas=None, beta_min: float = 0.1,
                 beta_max: float = 20.0, t_min: float | None = None, t_max: float = 1.0,
                 model_time_offset: float = 0.0, model_time_scale: float = 999.0,
                 sampler_defaults: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None, ignored_keys=()):
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule type {kind!r} is not one of {SCHEDULE_KINDS}")
        self.kind = kind
        self.sampler_defaults = dict(sampler_defaults or {})
        self.config = dict(config or {})
        self.ignored_keys = tuple(ignored_keys)
        self.model_time_offset = float(model_time_offset)
        self.model_time_scale = float(model_time_scale)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_max = float(t_max)
        self.betas = self.alphas_cumprod = self.sigmas = self.lambdas = None
        if kind == "discrete":
            self._init_discrete(np.asarray(betas, dtype=np.float64))
            self.t_min = 1.0 / self.num_train_timesteps if t_min is None else float(t_min)
        else:
            self.num_train_timesteps = None
            self.t_min = 1e-4 if t_min is None else float(t_min)

    def _init_discrete(self, betas: np.ndarray) -> None:
        if betas.ndim != 1 or betas.size < 2 or np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        self.betas = betas
        self.num_train_timesteps = betas.size
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.lambdas = -np.log(self.sigmas)  # log(alpha/sigma) = -log(VE sigma)
        # DPM-Solver's continuous view: knots (n+1)/N carrying log alpha_n.
        self._t_knots = np.arange(1, betas.size + 1, dtype=np.float64) / betas.size
        self._log_alpha_knots = 0.5 * np.cumsum(np.log1p(-betas))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Schedule":
        """Build from diffusers-style keys, plus ``type`` for the continuous kinds.

        discrete: num_train_timesteps, beta_schedule, beta_start, beta_end (or
        trained_betas), model_time_offset (0; 1 for U-ViT's n = 1..N).
        vp_continuous: beta_min (0.1), beta_max (20), model_time_scale (999), eps (1e-4).
        ddm_constant: sigma_min (0.01, so the last grid time is 1e-4), sigma_max (1).
        Recognised diffusers sampler options (clip_sample, timestep_spacing, steps_offset,
        variance_type, ...) become ``sampler_defaults``; options our maths cannot honour
        (prediction_type other than epsilon, karras sigmas, thresholding...) raise.
        """
        cfg = dict(config)
        kind = cfg.get("type", "discrete")
        defaults, ignored = {}, []
        for key, value in cfg.items():
            if key in _SAMPLER_KEYS:
                defaults[_SAMPLER_KEYS[key]] = value
            elif key in _PINNED_KEYS:
                if value != _PINNED_KEYS[key]:
                    raise ValueError(f"{key}={value!r} is not supported "
                                     f"(only {_PINNED_KEYS[key]!r})")
            elif key not in _SCHEDULE_KEYS:
                ignored.append(key)
        common = dict(sampler_defaults=defaults, config=cfg, ignored_keys=ignored)
        if kind == "discrete":
            if cfg.get("trained_betas") is not None:
                betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
            else:
                betas = _betas(cfg.get("beta_schedule", "linear"),
                               int(cfg.get("num_train_timesteps", 1000)),
                               float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)))
            return cls("discrete", betas=betas,
                       model_time_offset=cfg.get("model_time_offset", 0), **common)
        if kind == "vp_continuous":
            return cls(kind, beta_min=cfg.get("beta_min", 0.1), beta_max=cfg.get("beta_max", 20.0),
                       t_min=cfg.get("eps", 1e-4),
                       model_time_scale=cfg.get("model_time_scale", 999.0), **common)
        if kind == "ddm_constant":
            return cls(kind, t_min=float(cfg.get("sigma_min", 0.01)) ** 2,
                       t_max=cfg.get("sigma_max", 1.0), **common)
        raise ValueError(f"schedule type {kind!r} is not one of {SCHEDULE_KINDS}")

    def __repr__(self) -> str:
        if self.kind == "discrete":
            return (f"Schedule(discrete, N={self.num_train_timesteps}, "
                    f"offset={self.model_time_offset:g})")
        return f"Schedule({self.kind}, t in [{self.t_min:g}, {self.t_max:g}])"

    def require(self, *kinds: str) -> None:
        """Raise a clear error when a sampler meets a schedule kind it cannot drive."""
        if self.kind not in kinds:
            raise ValueError(f"this sampler needs a {' or '.join(kinds)} schedule, got {self.kind}")

    # --- time maps -----------------------------------------------------------------
    def model_time(self, t):
        """Sampler-native time -> the model's ``t`` input (float64).

        discrete: step index (maybe fractional) + model_time_offset; vp_continuous:
        ``t * model_time_scale``; ddm_constant: ``t`` unchanged.
        """
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "discrete":
            return t + self.model_time_offset
        if self.kind == "vp_continuous":
            return t * self.model_time_scale
        return t

    def continuous_model_time(self, t):
        """Continuous time in (0, 1] -> model input (discrete: step ``t·N - 1``)."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "discrete":
            return self.model_time(t * self.num_train_timesteps - 1.0)
        return self.model_time(t)

    # --- continuous-time VP view (DPM-Solver, Euler-Maruyama) --------------------
    def log_alpha(self, t):
        """log alpha_t of a continuous time t (VP kinds only)."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "vp_continuous":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        self.require("discrete", "vp_continuous")
        return np.interp(t, self._t_knots, self._log_alpha_knots)

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) with alpha_t² + sigma_t² = 1 (VP kinds)."""
        la = self.log_alpha(t)
        return np.exp(la), np.sqrt(-np.expm1(2.0 * la))

    def marginal_lambda(self, t):
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022)."""
        la = self.log_alpha(t)
        return la - 0.5 * np.log(-np.expm1(2.0 * la))

    def inverse_lambda(self, lam):
        """Continuous time whose half log-SNR is ``lam`` (inverse of marginal_lambda)."""
        lam = np.asarray(lam, dtype=np.float64)
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        if self.kind == "vp_continuous":
            # Solve -(b1-b0)t²/4 - b0 t/2 = log_alpha for t >= 0 (stable root form).
            b0, db = self.beta_min, self.beta_max - self.beta_min
            tmp = -4.0 * db * log_alpha
            return tmp / (np.sqrt(b0**2 + tmp) + b0) / db
        self.require("discrete", "vp_continuous")
        return np.interp(log_alpha, self._log_alpha_knots[::-1], self._t_knots[::-1])

    def beta_t(self, t):
        """Instantaneous beta(t) of the VP SDE (vp_continuous only)."""
        self.require("vp_continuous")
        return self.beta_min + np.asarray(t, dtype=np.float64) * (self.beta_max - self.beta_min)

    def to_config(self) -> dict:
        """The config this schedule was built from (what a bundle should record)."""
        return dict(self.config)
