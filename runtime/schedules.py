"""Noise schedules for the NumPy samplers (no torch here: this runs on edge boxes).

A schedule is built from the diffusers-style keys a bundle records
(``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``; ``type`` picks
a continuous kind) by :meth:`Schedule.from_config`, which looks the kind up in
:data:`SCHEDULE_KINDS` and returns an instance of that kind's class. Every kind holds, in
float64, its forward process ``x_t = signal·x0 + noise·eps`` (:meth:`Schedule.marginal`
at continuous time ``t`` in ``[t_min, t_max]``) and the map from a sampler's native time
to the model's ``t`` input (:meth:`Schedule.model_time`,
:meth:`Schedule.continuous_model_time`). The variance-preserving kinds (:class:`VPSchedule`)
add DPM-Solver's view: ``log alpha_t``, ``(alpha_t, sigma_t)``, the half log-SNR
``lambda = log(alpha_t / sigma_t)`` and its inverse. The discrete kind also holds betas,
alphas_cumprod, the variance-exploding sigmas ``sqrt((1 - abar) / abar)`` and lambdas per
step. A method a kind lacks raises the same ValueError as :meth:`Schedule.require`.

Three kinds (adding one is one subclass plus one line in ``SCHEDULE_KINDS``):

``discrete`` (default) — :class:`DiscreteSchedule`
    DDPM-style integer steps ``0..N-1`` (DDPM U-Net, DiT; U-ViT latent models with
    ``model_time_offset: 1`` because they were trained on ``n = 1..N``). The
    continuous view used by DPM-Solver follows Lu et al. 2022 (NoiseScheduleVP
    'discrete'): knots ``t_n = (n+1)/N`` with ``log alpha`` = 0.5·cumsum(log(1-beta)),
    interpolated piecewise-linearly; continuous ``t`` maps to step ``t·N - 1``.
``vp_continuous`` — :class:`VPContinuousSchedule`
    The score-SDE VP SDE (Song et al. 2021) with linear ``beta(t) = beta_min + t(beta_max
    - beta_min)``, ``t`` in ``[eps, 1]``; ``log alpha_t = -t²(b1-b0)/4 - t·b0/2``. The
    U-ViT pixel models (CIFAR-10 etc.) use beta_min 0.1, beta_max 20 and are called
    with ``t·999`` (``model_time_scale``).
``ddm_constant`` — :class:`DDMConstantSchedule`
    The decoupled model of arXiv 2306.13720: ``x_t = x0 + c·t + sqrt(t)·eps`` with
    ``c = -x0``, i.e. signal ``1 - t`` and noise ``sqrt(t)``, ``t`` in ``(0, 1]``; the model
    gets ``t`` itself. The official sampler (``sampler_ddm.py``) walks N steps of 1/N
    from t = 1 to 0, the last split at ``t_min`` (= sigma_min², 1e-4).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np

from .errors import InvalidInput

__all__ = ["Schedule", "VPSchedule", "DiscreteSchedule", "VPContinuousSchedule",
           "DDMConstantSchedule", "spaced_timesteps", "SCHEDULE_KINDS", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
DEFAULT_KIND = "discrete"  # a config without ``type``
# lucidrains' schedule_fn_kwargs of the sigmoid schedule (config key -> argument)
_SIGMOID_KEYS = {"sigmoid_start": "start", "sigmoid_end": "end", "sigmoid_tau": "tau"}

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
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")     # diffusers' names
# diffusers keys we accept only at the value that keeps our maths exact.
_PINNED_KEYS = {
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


def _sigmoid_betas(n: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> np.ndarray:
    """Jabri et al. 2022 (arXiv 2212.11972, Fig. 8) sigmoid schedule, as lucidrains'
    sigmoid_beta_schedule: abar(s) ∝ sigmoid(end/tau) - sigmoid((s·(end - start) + start)/tau)
    on s = i/n, normalised to abar(0) = 1, betas from the ratios clipped to [0, 0.999]. The two
    end values are float32 there (``torch.tensor(start / tau).sigmoid()``), so they are here."""
    def sig32(v):
        return np.float64(np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-v))))
    s = np.linspace(0.0, n, n + 1, dtype=np.float64) / n
    v_start, v_end = sig32(start / tau), sig32(end / tau)
    abar = (v_end - 1.0 / (1.0 + np.exp(-((s * (end - start) + start) / tau)))) / (v_end - v_start)
    abar = abar / abar[0]
    return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)


def _betas(schedule: str, n: int, beta_start: float, beta_end: float, **sigmoid) -> np.ndarray:
    """Betas in float64, same formulas as diffusers (which then rounds them to float32);
    ``sigmoid``: lucidrains' schedule (``sigmoid_start``/``_end``/``_tau`` keys)."""
    if schedule == "sigmoid":
        return _sigmoid_betas(n, **sigmoid)
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if schedule == "scaled_linear":  # latent-diffusion schedule: linear in sqrt(beta)
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021 cosine, betas capped at 0.999
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    raise InvalidInput(f"beta_schedule {schedule!r} is not one of {BETA_SCHEDULES}")


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading",
                     steps_offset: int = 0, *, extended: bool = False,
                     continuous: bool = False) -> np.ndarray:
    """Descending model timesteps for ``steps`` sampling steps, as diffusers' set_timesteps.

    ``spacing`` is one of linspace / leading / trailing (Lin et al. 2023, Table 2), or
    ``lucid``: lucidrains' ddim_sample grid, int(linspace(-1, N-1, steps+1)) in float32
    (truncated; its final -1 is the "after the last step" marker, so it is dropped here).
    ``extended`` reproduces DPMSolverMultistepScheduler (an N+1 grid whose last point is
    dropped); ``continuous`` reproduces Euler/Heun (float32 linspace, not rounded).
    """
    n = num_train_timesteps
    if not 1 <= steps <= n:
        raise InvalidInput(f"steps must be in [1, {n}], got {steps}")
    m = steps + 1 if extended else steps
    if spacing == "lucid":
        if extended or continuous:
            raise InvalidInput("timestep_spacing 'lucid' is lucidrains' DDIM grid: for the ddpm and ddim samplers only")
        return np.trunc(_linspace_f32(-1.0, n - 1.0, steps + 1))[::-1][:-1].astype(np.int64)
    if spacing == "linspace":
        if continuous:
            return np.linspace(0, n - 1, m, dtype=np.float32)[::-1].copy()
        ts = np.linspace(0, n - 1, m).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, m) * (n // m)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)) - 1
    else:
        raise InvalidInput(f"timestep_spacing {spacing!r} is not linspace, leading or trailing")
    if extended and spacing != "trailing":
        ts = ts[:-1]
    return ts.astype(np.float32 if continuous else np.int64).copy()


def _linspace_f32(start: float, end: float, m: int) -> np.ndarray:
    """torch.linspace in float32 on the CPU: the first half counted up from ``start``, the
    second down from ``end``, with a float32 step (so truncating it gives torch's integers)."""
    f = np.float32
    step = f((f(end) - f(start)) / f(m - 1))
    i = np.arange(m)
    up = f(start) + step * i.astype(np.float32)
    down = f(end) - step * (m - 1 - i).astype(np.float32)
    return np.where(i < m // 2, up, down)


def _kind_only(name: str, doc: str):
    """A base-class method for what only some kinds can do: the same error as ``require``."""
    def method(self, *args, **kwargs):
        base = getattr(Schedule, name)
        self.require(*(k for k, c in SCHEDULE_KINDS.items() if getattr(c, name) is not base))
        raise NotImplementedError(f"{type(self).__name__} does not implement {name}")
    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return method


class Schedule(ABC):
    """A noise schedule in float64; build it with :meth:`from_config`.

    Each kind is a subclass registered in :data:`SCHEDULE_KINDS`. Common attributes:
    ``kind``, ``t_min``/``t_max`` (the continuous time range), ``config`` (see
    :meth:`to_config`), ``sampler_defaults`` (diffusers options found in the config:
    clip_sample, timestep_spacing, ..., applied by ``sample()`` unless overridden),
    ``ignored_keys`` (config keys that had no effect) and ``num_train_timesteps``
    (``None`` for the continuous kinds).
    """

    kind: str | None = None                # the registry key; set by each kind
    default_sampler: str | None = None     # the sampler `generate` uses when nothing names one
    config_keys: frozenset[str] = frozenset()  # the kind's own config keys (besides ``type``)
    prediction_types: tuple[str, ...] = ()     # diffusers prediction_type values it can carry
    num_train_timesteps: int | None = None

    def __init__(self, *, t_min: float, t_max: float,
                 sampler_defaults: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None, ignored_keys=()):
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.sampler_defaults = dict(sampler_defaults or {})
        self.ignored_keys = tuple(ignored_keys)
        self.config = dict(config) if config is not None else self._describe()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Schedule":
        """Build from diffusers-style keys, plus ``type`` for the continuous kinds.

        discrete: num_train_timesteps, beta_schedule, beta_start, beta_end (or
        trained_betas), model_time_offset (0; 1 for U-ViT's n = 1..N).
        vp_continuous: beta_min (0.1), beta_max (20), model_time_scale (999), eps (1e-4).
        ddm_constant: sigma_min (0.01, so the last grid time is 1e-4), sigma_max (1);
        eps (the training range, recorded only).
        Recognised diffusers sampler options (clip_sample, timestep_spacing, steps_offset,
        variance_type, ...) become ``sampler_defaults``; options our maths cannot honour
        (karras sigmas, thresholding...) raise; ``prediction_type`` (epsilon, sample,
        v_prediction) is the bundle's ``prediction`` and must agree with it.
        Called on a kind's class, ``type`` defaults to that kind and must be it.
        """
        cfg = dict(config)
        kind = cfg.get("type", cls.kind or DEFAULT_KIND)
        kind_cls = SCHEDULE_KINDS.get(kind) if isinstance(kind, str) else None
        if kind_cls is None:
            raise InvalidInput(f"schedule type {kind!r} is not one of {tuple(SCHEDULE_KINDS)}")
        if not issubclass(kind_cls, cls):
            raise InvalidInput(f"{cls.__name__}.from_config got a {kind} schedule config")
        bad = [k for k, v in cfg.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise InvalidInput(f"schedule value(s) {', '.join(bad)} must be finite numbers")
        defaults, ignored = {}, []
        for key, value in cfg.items():
            if key in _SAMPLER_KEYS:
                defaults[_SAMPLER_KEYS[key]] = value
            elif key in _PINNED_KEYS:
                if value != _PINNED_KEYS[key]:
                    raise InvalidInput(f"{key}={value!r} is not supported "
                                     f"(only {_PINNED_KEYS[key]!r})")
            elif key == "prediction_type":      # the model's business: samplers read its outputs
                if value not in kind_cls.prediction_types:
                    raise InvalidInput(f"prediction_type={value!r} is not one of {kind_cls.prediction_types} "
                                       f"(for a {kind} schedule)")
            elif key != "type" and key not in kind_cls.config_keys:
                ignored.append(key)
        return kind_cls.from_kind_config(cfg, sampler_defaults=defaults, config=cfg,
                                         ignored_keys=ignored)

    @classmethod
    @abstractmethod
    def from_kind_config(cls, cfg: Mapping[str, Any], **common) -> "Schedule":
        """This kind from its own config keys (today's defaults); ``common`` goes to __init__."""

    def _describe(self) -> dict:
        """A config that rebuilds this schedule (for one constructed directly)."""
        return {"type": self.kind}

    def to_config(self) -> dict:
        """The config this schedule was built from (what a bundle should record)."""
        return dict(self.config)

    def require(self, *kinds: str) -> None:
        """Raise a clear error when a sampler meets a schedule kind it cannot drive."""
        if self.kind not in kinds:
            raise InvalidInput(f"this sampler needs a {' or '.join(kinds)} schedule, got {self.kind}")

    # --- forward process and time maps (every kind) ------------------------------------
    @abstractmethod
    def marginal(self, t):
        """(signal, noise) in float64 with x_t = signal·x0 + noise·eps, t in [t_min, t_max]."""

    @abstractmethod
    def model_time(self, t):
        """Sampler-native time -> the model's ``t`` input (float64)."""

    def continuous_model_time(self, t):
        """Continuous time in [t_min, t_max] -> model input."""
        return self.model_time(np.asarray(t, dtype=np.float64))

    # --- continuous-time VP view: VPSchedule kinds only ----------------------------------
    log_alpha = _kind_only("log_alpha", "log alpha_t of a continuous time t (VP kinds only).")
    alpha_sigma = _kind_only("alpha_sigma", "(alpha_t, sigma_t) with alpha² + sigma² = 1 "
                                            "(VP kinds only).")
    marginal_lambda = _kind_only("marginal_lambda", "Half log-SNR lambda_t (VP kinds only).")
    inverse_lambda = _kind_only("inverse_lambda", "Inverse of marginal_lambda (VP kinds only).")
    beta_t = _kind_only("beta_t", "Instantaneous beta(t) of the VP SDE (vp_continuous only).")


class VPSchedule(Schedule):
    """Variance-preserving kinds: alpha_t² + sigma_t² = 1, given by ``log_alpha``."""

    prediction_types = _PREDICTION_TYPES

    @abstractmethod
    def log_alpha(self, t):
        """log alpha_t of a continuous time t."""

    @abstractmethod
    def _time_of_log_alpha(self, log_alpha):
        """The continuous time whose log alpha is ``log_alpha`` (float64 array)."""

    def marginal(self, t):
        """(alpha_t, sigma_t): x_t = alpha_t·x0 + sigma_t·eps."""
        return self.alpha_sigma(t)

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) with alpha_t² + sigma_t² = 1."""
        la = self.log_alpha(t)
        return np.exp(la), np.sqrt(-np.expm1(2.0 * la))

    def marginal_lambda(self, t):
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022)."""
        la = self.log_alpha(t)
        return la - 0.5 * np.log(-np.expm1(2.0 * la))

    def inverse_lambda(self, lam):
        """Continuous time whose half log-SNR is ``lam`` (inverse of marginal_lambda)."""
        lam = np.asarray(lam, dtype=np.float64)
        return self._time_of_log_alpha(-0.5 * np.logaddexp(0.0, -2.0 * lam))


class DiscreteSchedule(VPSchedule):
    """DDPM-style integer steps from ``betas``: attributes ``betas``, ``alphas_cumprod``,
    ``sigmas`` (VE sigma per step), ``lambdas`` (half log-SNR per step),
    ``num_train_timesteps`` and ``model_time_offset``; continuous t in [1/N, 1]."""

    kind = "discrete"
    default_sampler = "dpmpp_2m"          # what generate uses when nothing names a sampler
    config_keys = frozenset({"num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                             "trained_betas", "model_time_offset", *_SIGMOID_KEYS})

    def __init__(self, betas, *, model_time_offset: float = 0.0, t_min: float | None = None,
                 t_max: float = 1.0, **common):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2 or not np.isfinite(betas).all() or np.any(betas <= 0) or np.any(betas >= 1):
            raise InvalidInput("betas must be a 1-D array with values in (0, 1)")
        self.betas = betas
        self.num_train_timesteps = betas.size
        self.model_time_offset = float(model_time_offset)
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.lambdas = -np.log(self.sigmas)  # log(alpha/sigma) = -log(VE sigma)
        # DPM-Solver's continuous view: knots (n+1)/N carrying log alpha_n.
        self._t_knots = np.arange(1, betas.size + 1, dtype=np.float64) / betas.size
        self._log_alpha_knots = 0.5 * np.cumsum(np.log1p(-betas))
        super().__init__(t_min=1.0 / betas.size if t_min is None else t_min, t_max=t_max,
                         **common)

    @classmethod
    def from_kind_config(cls, cfg, **common):
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        else:
            betas = _betas(cfg.get("beta_schedule", "linear"),
                           int(cfg.get("num_train_timesteps", 1000)),
                           float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)),
                           **{arg: float(cfg[key]) for key, arg in _SIGMOID_KEYS.items() if key in cfg})
        return cls(betas, model_time_offset=cfg.get("model_time_offset", 0), **common)

    def _describe(self):
        return {"type": self.kind, "trained_betas": self.betas.tolist(),
                "model_time_offset": self.model_time_offset}

    def __repr__(self):
        return (f"DiscreteSchedule(N={self.num_train_timesteps}, "
                f"offset={self.model_time_offset:g})")

    def model_time(self, t):
        """Step index (maybe fractional) + model_time_offset."""
        return np.asarray(t, dtype=np.float64) + self.model_time_offset

    def continuous_model_time(self, t):
        """Continuous time in (0, 1] -> model input of step ``t·N - 1``."""
        t = np.asarray(t, dtype=np.float64)
        return self.model_time(t * self.num_train_timesteps - 1.0)

    def log_alpha(self, t):
        """log alpha_t, piecewise linear between the knots (n+1)/N."""
        return np.interp(np.asarray(t, dtype=np.float64), self._t_knots, self._log_alpha_knots)

    def _time_of_log_alpha(self, log_alpha):
        return np.interp(log_alpha, self._log_alpha_knots[::-1], self._t_knots[::-1])


class VPContinuousSchedule(VPSchedule):
    """The score-SDE VP SDE with linear beta(t) from ``beta_min`` to ``beta_max``; the
    model gets ``t·model_time_scale``."""

    kind = "vp_continuous"
    default_sampler = "dpm_solver"        # U-ViT's own recipe
    config_keys = frozenset({"beta_min", "beta_max", "model_time_scale", "eps"})

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, *,
                 model_time_scale: float = 999.0, t_min: float = 1e-4, t_max: float = 1.0,
                 **common):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.model_time_scale = float(model_time_scale)
        super().__init__(t_min=t_min, t_max=t_max, **common)

    @classmethod
    def from_kind_config(cls, cfg, **common):
        return cls(cfg.get("beta_min", 0.1), cfg.get("beta_max", 20.0),
                   t_min=cfg.get("eps", 1e-4),
                   model_time_scale=cfg.get("model_time_scale", 999.0), **common)

    def _describe(self):
        return {"type": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "model_time_scale": self.model_time_scale, "eps": self.t_min}

    def __repr__(self):
        return (f"VPContinuousSchedule(beta {self.beta_min:g}..{self.beta_max:g}, "
                f"t in [{self.t_min:g}, {self.t_max:g}], scale={self.model_time_scale:g})")

    def model_time(self, t):
        """``t * model_time_scale``."""
        return np.asarray(t, dtype=np.float64) * self.model_time_scale

    def log_alpha(self, t):
        """log alpha_t = -1/2 ∫_0^t beta(u) du."""
        t = np.asarray(t, dtype=np.float64)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _time_of_log_alpha(self, log_alpha):
        # Solve -(b1-b0)t²/4 - b0 t/2 = log_alpha for t >= 0 (stable root form).
        b0, db = self.beta_min, self.beta_max - self.beta_min
        tmp = -4.0 * db * log_alpha
        return tmp / (np.sqrt(b0**2 + tmp) + b0) / db

    def beta_t(self, t):
        """Instantaneous beta(t) of the VP SDE."""
        return self.beta_min + np.asarray(t, dtype=np.float64) * (self.beta_max - self.beta_min)


class DDMConstantSchedule(Schedule):
    """The decoupled model's constant-c process: x_t = (1 - t)·x0 + sqrt(t)·eps, t in
    [sigma_min², sigma_max]; the model gets ``t`` itself."""

    kind = "ddm_constant"
    default_sampler = "ddm"               # the official DDM-Public loop
    config_keys = frozenset({"sigma_min", "sigma_max", "eps"})

    def __init__(self, *, t_min: float = 1e-4, t_max: float = 1.0, **common):
        super().__init__(t_min=t_min, t_max=t_max, **common)

    @classmethod
    def from_kind_config(cls, cfg, **common):
        return cls(t_min=float(cfg.get("sigma_min", 0.01)) ** 2,
                   t_max=cfg.get("sigma_max", 1.0), **common)

    def _describe(self):
        return {"type": self.kind, "sigma_min": math.sqrt(self.t_min), "sigma_max": self.t_max}

    def __repr__(self):
        return f"DDMConstantSchedule(t in [{self.t_min:g}, {self.t_max:g}])"

    def marginal(self, t):
        """(1 - t, sqrt(t)): x_t = x0 + c·t + sqrt(t)·eps with c = -x0."""
        t = np.asarray(t, dtype=np.float64)
        return 1.0 - t, np.sqrt(t)

    def model_time(self, t):
        """``t`` unchanged."""
        return np.asarray(t, dtype=np.float64)


# Schedule kinds by config ``type``: adding a kind is one Schedule subclass and one line here.
SCHEDULE_KINDS: dict[str, type[Schedule]] = {
    "discrete": DiscreteSchedule,
    "vp_continuous": VPContinuousSchedule,
    "ddm_constant": DDMConstantSchedule,
}
