"""ODE solvers for the NumPy sampler loop, and the helpers every sampler shares.

Each solver is a small pure function ``sample_x(denoise, x, schedule, steps, noise, *,
options..., callback=None) -> x0`` in the k-diffusion style: all schedule maths
(float64) is precomputed once per call, the loop only does array arithmetic in the
caller's dtype. ``denoise(x, t)`` gets ``t`` as a float32 vector [B] in the model's own
time convention and returns the noise prediction: an ndarray (``eps``), a dict of named
outputs (``{"eps": ..., "var": ...}``), or a tuple in the documented order. A dict may
carry ``x0`` (x0-prediction, diffusers' "sample") or ``v`` (v-prediction, Salimans & Ho
2022) instead of ``eps``: :func:`predict` is the one place that turns any of them into
(eps, x0) at the step's marginal x = alpha·x0 + sigma·eps, so no sampler has
per-prediction code.

The solvers here are deterministic (``noise`` is accepted and unused):
``dpmpp_2m`` (diffusers DPMSolverMultistepScheduler), ``euler`` (EulerDiscreteScheduler),
``heun`` (HeunDiscreteScheduler) and ``dpm_solver`` (singlestep DPM-Solver, the U-ViT
recipe). The ancestral / stochastic samplers live in ``samplers.py``.
"""

from __future__ import annotations

import numpy as np

from .schedules import Schedule, spaced_timesteps
from .errors import InvalidInput

__all__ = ["sample_dpmpp_2m", "sample_euler", "sample_heun", "sample_dpm_solver",
           "noise_source", "outputs", "eps_of", "predict", "sigma_grid", "PREDICTION_OUTPUTS"]


# --- shared helpers ------------------------------------------------------------------
def noise_source(noise, dtype):
    """``noise`` (None, np.random.Generator or callable ``noise(i, shape)``) -> (i, shape) -> array.

    A Generator is drawn from in step order, only at steps that add noise; a callable
    is asked for step ``i``'s noise, so a trajectory can be replayed exactly.
    """
    dtype = np.dtype(dtype)
    if noise is None:
        def missing(i, shape):
            raise InvalidInput("this sampler is stochastic: pass noise=np.random.Generator or "
                             "a callable noise(i, shape)")
        return missing
    if isinstance(noise, np.random.Generator):
        draw_dtype = np.float64 if dtype == np.float64 else np.float32
        return lambda i, shape: noise.standard_normal(shape, dtype=draw_dtype).astype(
            dtype, copy=False)
    if callable(noise):
        def from_callable(i, shape):
            z = np.asarray(noise(i, shape), dtype=dtype)
            if z.shape != tuple(shape):
                raise InvalidInput(f"noise({i}, {tuple(shape)}) returned shape {z.shape}")
            return z
        return from_callable
    raise TypeError("noise must be None, a numpy Generator or a callable noise(i, shape)")


def call(denoise, x, t):
    """One denoiser call; ``t`` (model convention) is broadcast to a float32 vector [B]."""
    return denoise(x, np.full((x.shape[0],), t, dtype=np.float32))


def outputs(out, x, names):
    """The denoiser's named outputs, in the order of ``names``, as arrays.

    dict: looked up by name. tuple/list: positional, in ``names`` order. ndarray: the
    only output, or (several names) the channel-concatenation of all of them, as a
    [B, len(names)·C, ...] tensor is split in diffusers' and DDM's convention.
    """
    if isinstance(out, dict):
        missing = [n for n in names if n not in out]
        if missing:
            raise InvalidInput(f"this sampler needs the denoiser outputs {list(names)}; the model gives "
                               f"{sorted(out)} (a sampler of another schedule kind?)")
        return [np.asarray(out[n]) for n in names]
    if isinstance(out, (tuple, list)):
        if len(out) < len(names):
            raise InvalidInput(f"denoiser returned {len(out)} outputs, need {names}")
        return [np.asarray(o) for o in out[:len(names)]]
    out = np.asarray(out)
    c = x.shape[1]
    if out.shape == x.shape and len(names) == 1:
        return [out]
    if out.ndim == x.ndim and out.shape[1] in (2 * c, len(names) * c):
        parts = [out[:, k * c:(k + 1) * c] for k in range(out.shape[1] // c)]
        if len(parts) >= len(names):  # learned-sigma eps|v: eps-only samplers keep eps
            return parts[:len(names)]
    raise InvalidInput(f"denoiser output of shape {out.shape} does not give {names} for x {x.shape}")


def eps_of(out, x):
    """The noise prediction of one denoiser call."""
    return outputs(out, x, ("eps",))[0]


# The output that names each prediction type (diffusers' prediction_type).
PREDICTION_OUTPUTS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def predict(out, x, alpha: float, sigma: float):
    """(eps, x0) of one denoiser call at the marginal x = alpha·x0 + sigma·eps.

    An ``eps`` output gives (eps, None): the sampler derives x0 with its own coefficients
    (so the ε paths keep their exact numerics). ``v`` = alpha·eps - sigma·x0 gives
    eps = sigma·x + alpha·v and x0 = alpha·x - sigma·v, both without cancellation, so
    nothing divides by a vanishing alpha at high noise; ``x0`` gives eps = (x - alpha·x0)/sigma.
    """
    if isinstance(out, dict) and "eps" not in out:
        if "v" in out:
            v = np.asarray(out["v"])
            return sigma * x + alpha * v, alpha * x - sigma * v
        if "x0" in out:
            x0 = np.asarray(out["x0"])
            return (x - alpha * x0) / sigma, x0
    return eps_of(out, x), None


def report(callback, i, total, t, x, denoised=None):
    """k-diffusion style progress callback: a dict with i, total, t (model time), x, denoised."""
    if callback is not None:
        callback({"i": i, "total": total, "t": float(t), "x": x, "denoised": denoised})


def _interp_sigmas(schedule: Schedule, timesteps):
    """VE sigma at (maybe fractional) timesteps, linear interpolation as diffusers."""
    n = schedule.num_train_timesteps
    return np.interp(np.asarray(timesteps, np.float64), np.arange(n), schedule.sigmas)


def _final_sigma(schedule: Schedule, final_sigmas_type: str) -> float:
    if final_sigmas_type == "zero":
        return 0.0
    if final_sigmas_type == "sigma_min":
        return float(schedule.sigmas[0])
    raise InvalidInput(f"final_sigmas_type must be zero or sigma_min, got {final_sigmas_type!r}")


# --- DPM-Solver++(2M) ------------------------------------------------------------------
def sample_dpmpp_2m(denoise, x, schedule: Schedule, steps: int, noise=None, *,
                    timestep_spacing="linspace", steps_offset=0, solver_order=2,
                    solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                    final_sigmas_type="zero", callback=None):
    """DPM-Solver++(2M), multistep, data prediction (Lu et al. 2022, arXiv 2211.01095, Alg. 2).

    Same steps as diffusers' DPMSolverMultistepScheduler at its defaults: timesteps from
    an N+1 grid (last point dropped), first step first-order, last step first-order when
    fewer than 15 steps or when the final sigma is zero. x_T ~ N(0, I) (init sigma 1).
    """
    schedule.require("discrete")
    if solver_order not in (1, 2) or solver_type not in ("midpoint", "heun"):
        raise InvalidInput("dpmpp_2m supports solver_order 1|2 and solver_type midpoint|heun")
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, timestep_spacing, steps_offset,
                          extended=True)
    n = len(ts)
    sig = np.append(_interp_sigmas(schedule, ts), _final_sigma(schedule, final_sigmas_type))
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    sigma = sig * alpha
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma 0 at the end: lambda = +inf
        lam = np.log(alpha) - np.log(sigma)
        h = lam[1:] - lam[:-1]
        ratio = sigma[1:] / sigma[:-1]
        b = -alpha[1:] * np.expm1(-h)  # weight of the data prediction
        r0 = np.r_[np.nan, (lam[1:-1] - lam[:-2])] / h
        heun_c = alpha[1:] * (np.expm1(-h) / h + 1.0)
    last_first_order = (euler_at_final or (lower_order_final and n < 15)
                        or final_sigmas_type == "zero")
    x0_prev = None
    for i in range(n):
        eps, x0 = predict(call(denoise, x, schedule.model_time(ts[i])), x, float(alpha[i]), float(sigma[i]))
        if x0 is None:
            x0 = (x - float(sigma[i]) * eps) / float(alpha[i])
        if solver_order == 1 or i == 0 or (i == n - 1 and last_first_order):
            x = float(ratio[i]) * x + float(b[i]) * x0
        else:
            d1 = (x0 - x0_prev) / float(r0[i])
            extra = 0.5 * float(b[i]) if solver_type == "midpoint" else float(heun_c[i])
            x = float(ratio[i]) * x + float(b[i]) * x0 + extra * d1
        x0_prev = x0
        report(callback, i, n, schedule.model_time(ts[i]), x, x0)
    return x


# --- Euler and Heun in the VE sigma parametrisation --------------------------------
def sigma_grid(schedule, steps, timestep_spacing="linspace", steps_offset=0):
    """Float timesteps and VE sigmas (+ a final 0) of Euler/Heun, as diffusers builds them."""
    schedule.require("discrete")
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, timestep_spacing, steps_offset,
                          continuous=True)
    return ts, np.append(_interp_sigmas(schedule, ts), 0.0)


def sample_euler(denoise, x, schedule: Schedule, steps: int, noise=None, *,
                 timestep_spacing="linspace", steps_offset=0, callback=None):
    """Euler on the probability-flow ODE dx/dsigma = eps (Karras et al. 2022, Alg. 2, no churn).

    As diffusers' EulerDiscreteScheduler at its defaults: x lives in the VE space
    x = x0 + sigma·eps, the model sees x / sqrt(sigma² + 1) and a float timestep
    (linspace timesteps are not rounded). x_T ~ init_noise_sigma·N(0, I): sigma_max for
    linspace/trailing spacing, sqrt(sigma_max² + 1) for leading (diffusers' rule).
    """
    ts, sig = sigma_grid(schedule, steps, timestep_spacing, steps_offset)
    c_in = 1.0 / np.sqrt(sig**2 + 1.0)
    for i in range(len(ts)):
        t = schedule.model_time(ts[i])
        x_in = x * float(c_in[i])
        eps, denoised = predict(call(denoise, x_in, t), x_in, float(c_in[i]), float(sig[i] * c_in[i]))
        if denoised is None:
            denoised = x - float(sig[i]) * eps
        x = x + float(sig[i + 1] - sig[i]) * eps  # derivative (x - denoised)/sigma is eps
        report(callback, i, len(ts), t, x, denoised)
    return x


def sample_heun(denoise, x, schedule: Schedule, steps: int, noise=None, *,
                timestep_spacing="linspace", steps_offset=0, clip_sample=False,
                clip_sample_range=1.0, callback=None):
    """Heun's second-order method on the PF-ODE (Karras et al. 2022, Alg. 1, no churn).

    As diffusers' HeunDiscreteScheduler: 2·steps - 1 model calls, the corrector evaluates
    at the next grid timestep, the last step (to sigma 0) is Euler. x_T as for ``euler``.
    """
    ts, sig = sigma_grid(schedule, steps, timestep_spacing, steps_offset)
    c_in = 1.0 / np.sqrt(sig**2 + 1.0)

    def slope(xi, k):  # (x - denoised) / sigma at grid point k
        x_in = xi * float(c_in[k])
        eps, denoised = predict(call(denoise, x_in, schedule.model_time(ts[k])), x_in, float(c_in[k]),
                                float(sig[k] * c_in[k]))
        if denoised is None:
            denoised = xi - float(sig[k]) * eps
        if clip_sample:
            denoised = np.clip(denoised, -clip_sample_range, clip_sample_range)
        return (xi - denoised) / float(sig[k]), denoised

    n = len(ts)
    for i in range(n):
        d, denoised = slope(x, i)
        dt = float(sig[i + 1] - sig[i])
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            d2, _ = slope(x + d * dt, i + 1)
            x = x + (d + d2) * (0.5 * dt)
        report(callback, i, n, schedule.model_time(ts[i]), x, denoised)
    return x


# --- singlestep DPM-Solver (U-ViT's samplers) ---------------------------------------------
def _fast_orders(steps: int, order: int):
    """DPM-Solver-fast order recipe (Lu et al. 2022, arXiv 2206.00927, Sec. 3.4)."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    raise InvalidInput("dpm_solver order must be 2 or 3 for the fast methods")


def _time_grid(schedule, skip_type, t_start, t_end, n):
    if skip_type == "logSNR":
        lam = np.linspace(schedule.marginal_lambda(t_start), schedule.marginal_lambda(t_end), n + 1)
        return schedule.inverse_lambda(lam)
    if skip_type == "time_uniform":
        return np.linspace(t_start, t_end, n + 1)
    raise InvalidInput(f"skip_type must be logSNR or time_uniform, got {skip_type!r}")


def _dpm_plan(schedule, steps, method, order, skip_type, t_start, t_end):
    """Outer steps as (s, t, order, r1, r2, s1, s2) in continuous time."""
    if method == "fast_grid":  # dpm_solver_pp.py 'fast': every step spans `order` grid cells
        orders = _fast_orders(steps, order)
        grid = _time_grid(schedule, skip_type, t_start, t_end, steps)
        lam, plan, i = schedule.marginal_lambda(grid), [], 0
        for k in orders:
            h = lam[i + k] - lam[i]
            r = [float((lam[i + j] - lam[i]) / h) for j in (1, 2)[:k - 1]] + [None] * (3 - k)
            mids = [float(grid[i + j]) for j in (1, 2)[:k - 1]] + [None] * (3 - k)
            plan.append((grid[i], grid[i + k], k, r[0], r[1], mids[0], mids[1]))
            i += k
        return plan
    if method == "fast":  # dpm_solver_pytorch.py: K = steps//3 + 1 logSNR-uniform steps
        orders = _fast_orders(steps, 3)
    elif method == "singlestep":
        orders = [order] * (steps // order)
    else:
        raise InvalidInput(f"dpm_solver method must be fast, fast_grid or singlestep, got {method!r}")
    grid = _time_grid(schedule, skip_type, t_start, t_end, len(orders))
    plan = []
    for i, k in enumerate(orders):
        r1, r2 = {1: (None, None), 2: (0.5, None), 3: (1 / 3, 2 / 3)}[k]
        lam_s, lam_t = schedule.marginal_lambda([grid[i], grid[i + 1]])
        mids = [float(schedule.inverse_lambda(lam_s + r * (lam_t - lam_s))) if r else None
                for r in (r1, r2)]
        plan.append((grid[i], grid[i + 1], k, r1, r2, mids[0], mids[1]))
    return plan


def _dpm_coeffs(schedule, s, t, data_pred):
    """(R, c1, c2) of a DPM-Solver step s -> t: x_t = R·x_s + c1·m_s + (corrections)·c2.

    Noise prediction: R = alpha_t/alpha_s, c1 = -sigma_t·expm1(h), c2 = -sigma_t·phi2(h);
    data prediction (DPM-Solver++): R = sigma_t/sigma_s, c1 = -alpha_t·expm1(-h),
    c2 = -alpha_t·phi2(-h); phi2(y) = expm1(y)/y - 1 and h = lambda_t - lambda_s.
    """
    (a_s, a_t), (sg_s, sg_t) = schedule.alpha_sigma([s, t])
    h = schedule.marginal_lambda(t) - schedule.marginal_lambda(s)
    y = -h if data_pred else h
    scale = a_t if data_pred else sg_t
    ratio = sg_t / sg_s if data_pred else a_t / a_s
    return float(ratio), float(-scale * np.expm1(y)), float(-scale * (np.expm1(y) / y - 1.0))


def sample_dpm_solver(denoise, x, schedule: Schedule, steps: int, noise=None, *,
                      algorithm=None, method=None, order=3, skip_type=None, t_start=1.0,
                      t_end=None, callback=None):
    """Singlestep DPM-Solver-1/2/3 (Lu et al. 2022, arXiv 2206.00927, Alg. 1-2; ++: 2211.01095).

    ``steps`` is the number of model calls. Defaults follow the official U-ViT code:
    vp_continuous (U-ViT pixel models, eval.py + dpm_solver_pytorch.py): noise prediction,
    method "fast" (steps//3+1 logSNR-uniform steps of orders 3..3,2,1 with r = 1/3, 2/3),
    from t=1 to t_end=1e-4. discrete (U-ViT latent models, eval_ldm_discrete.py +
    dpm_solver_pp.py): data prediction ("dpmsolver++"), method "fast_grid" (a
    time-uniform grid of steps+1 points, an order-k step spans k cells), t_end = 1/N.
    x_T ~ N(0, I).
    """
    schedule.require("discrete", "vp_continuous")
    pixel = schedule.kind == "vp_continuous"
    algorithm = algorithm or ("dpmsolver" if pixel else "dpmsolver++")
    method = method or ("fast" if pixel else "fast_grid")
    skip_type = skip_type or ("logSNR" if method == "fast" else "time_uniform")
    t_end = schedule.t_min if t_end is None else t_end
    if algorithm not in ("dpmsolver", "dpmsolver++"):
        raise InvalidInput(f"algorithm must be dpmsolver or dpmsolver++, got {algorithm!r}")
    data_pred = algorithm == "dpmsolver++"
    plan = _dpm_plan(schedule, steps, method, order, skip_type, t_start, t_end)

    def model(xi, t):  # noise or data prediction at continuous time t
        a, sg = schedule.alpha_sigma(t)
        eps, x0 = predict(call(denoise, xi, schedule.continuous_model_time(t)), xi, float(a), float(sg))
        if not data_pred:
            return eps
        return (xi - float(sg) * eps) / float(a) if x0 is None else x0

    for i, (s, t, k, r1, r2, s1, s2) in enumerate(plan):
        ratio, c1, c2 = _dpm_coeffs(schedule, s, t, data_pred)
        m_s = model(x, s)
        x_new = ratio * x + c1 * m_s
        if k >= 2:
            rat1, c1_1, _ = _dpm_coeffs(schedule, s, s1, data_pred)
            m_1 = model(rat1 * x + c1_1 * m_s, s1)
            if k == 2:
                x_new = x_new + (0.5 / r1) * c1 * (m_1 - m_s)
            else:
                rat2, c1_2, c2_2 = _dpm_coeffs(schedule, s, s2, data_pred)
                m_2 = model(rat2 * x + c1_2 * m_s + (r2 / r1) * c2_2 * (m_1 - m_s), s2)
                x_new = x_new + (1.0 / r2) * c2 * (m_2 - m_s)
        x = x_new
        report(callback, i, len(plan), schedule.continuous_model_time(s), x)
    return x
