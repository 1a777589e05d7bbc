"""Classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233, Alg. 1 and 2), torch-free.

The bundle's ``classifier`` component gives g = ∇x log p(y | x_t, t) (``classifier_grad.onnx``).
guided-diffusion applies ``s·g`` (``cond_fn`` times ``classifier_scale``) in two ways:

- ancestral sampling (``p_sample`` → ``condition_mean``): the step's mean moves by
  Σ_t·s·g, Σ_t the variance the model uses at that step;
- DDIM (``ddim_sample`` → ``condition_score``): the score is corrected,
  ε' = ε − sqrt(1 − ᾱ_t)·s·g.

Samplers here are pure functions that only call ``denoise(x, t)``, so guidance is a wrapper
(:class:`ClassifierGuided`) that returns the ε whose step is the guided one:

- ``ddim``, ``dpmpp_2m``: the score form above (DPM-Solver++ integrates the same probability-flow
  ODE with the corrected score, as DDIM's Eq. 12 does);
- ``ddpm``: the step's mean is c0·x̂0 + c1·x_t with x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε)/sqrt(ᾱ_t) and
  c0 = sqrt(ᾱ_prev)·β_t/(1 − ᾱ_t), so moving it by Σ_t·s·g is
  ε' = ε − sqrt(α_t)·sqrt(1 − ᾱ_t)/β_t · Σ_t·s·g (α_t = ᾱ_t/ᾱ_prev, β_t = 1 − α_t on the
  respaced grid), with Σ_t as guided-diffusion's ``p_mean_variance`` gives it: the posterior
  variance (fixed_small), β_t with the posterior variance of the second step at the last
  one (fixed_large), exp(frac·log β_t + (1 − frac)·log posterior variance, clipped the same
  way) (learned_range);
- other samplers: refused (their steps are not of these forms).

guided-diffusion clips x̂0 *before* applying the correction and never after, so the wrapper
clips (when the sampler would) and switches the sampler's own clipping off. The classifier
gets the sample x_t, the original training step (respaced grids keep it, as guided-diffusion's
``_WrappedModel`` maps it) and the labels. With classifier-free guidance, ε is the guided
mixture first; the classifier term is added to it.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from .errors import InvalidInput
from .schedules import Schedule, spaced_timesteps

# sampler -> how guided-diffusion applies the gradient to its step
FORMS = {"ddpm": "mean", "ddim": "score", "dpmpp_2m": "score"}


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise InvalidInput(f"the classifier scale must be a number, got {scale!r}")
    if not math.isfinite(float(scale)):
        raise InvalidInput(f"the classifier scale must be a finite number, got {scale}")
    return float(scale)


def check_sampler(sampler: str) -> str:
    if sampler not in FORMS:
        raise InvalidInput(f"classifier guidance works with the {', '.join(FORMS)} samplers (guided-diffusion's "
                           f"condition_mean / condition_score), not {sampler!r}")
    return FORMS[sampler]


def classifier_guidance(classifier, scale, labels=None, sampler: str | None = None) -> bool:
    """Whether classifier guidance is on (scale ≠ 0), after checking that it can be: a
    finite scale, a classifier, labels and a sampler it applies to (one-line errors)."""
    if not check_scale(scale):
        return False
    if classifier is None:
        raise InvalidInput("classifier guidance needs a classifier in the bundle: add one with "
                           "`edgediff add-classifier BUNDLE --checkpoint FILE --config FILE`")
    if sampler is not None:
        check_sampler(sampler)
        if labels is None:
            raise InvalidInput("classifier guidance needs class labels")
    return True


def effective_options(sampler: str, schedule: Schedule, options: dict) -> dict:
    """The options sampler ``sampler`` will run with: its keyword defaults, overridden by
    the schedule's recorded ones, overridden by ``options``."""
    from .samplers import get_sampler, sampler_options

    defaults = {k: p.default for k, p in inspect.signature(get_sampler(sampler).fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **sampler_options(sampler, schedule, options)}


def mean_coefficients(schedule: Schedule, steps: int, variance: str, spacing: str, offset: int) -> dict:
    """step n -> (k_n, log β_n, log Σ̃_n): ε' = ε − k_n·Σ_n·s·g moves the ddpm sampler's mean by
    Σ_n·s·g; Σ_n from the logs (learned_range interpolates them) or fixed."""
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, offset)     # descending
    ac = schedule.alphas_cumprod
    a_t = ac[ts]
    a_p = np.append(ac[ts[1:]], 1.0)
    beta = 1.0 - a_t / a_p
    post = (1.0 - a_p) / (1.0 - a_t) * beta                  # 0 at the last step
    # guided-diffusion's posterior_log_variance_clipped and fixed_large: the last step (its
    # index 0) borrows the posterior variance of the step before it
    borrowed = post[-2] if len(ts) > 1 else max(post[-1], 1e-20)
    post_clipped = np.append(post[:-1], borrowed)
    fixed = {"fixed_small": post, "fixed_large": np.append(beta[:-1], borrowed)}
    k = np.sqrt(a_t / a_p) * np.sqrt(1.0 - a_t) / beta
    table = {}
    for i, n in enumerate(ts):
        var = fixed.get(variance)
        table[int(n)] = (float(k[i]), float(np.log(beta[i])), float(np.log(post_clipped[i])),
                         None if var is None else float(var[i]))
    return table


class ClassifierGuided:
    """``denoise(x, t)`` with the classifier's gradient applied as guided-diffusion applies it."""

    def __init__(self, denoise, classifier, labels: np.ndarray, scale: float, schedule: Schedule,
                 sampler: str, steps: int, options: dict):
        """``options``: the sampler's effective options (:func:`effective_options`)."""
        self.denoise, self.classifier = denoise, classifier
        self.labels = np.asarray(labels, dtype=np.int64)
        self.scale = check_scale(scale)
        self.form = check_sampler(sampler)
        schedule.require("discrete")
        self.abar = schedule.alphas_cumprod
        self.offset = float(schedule.model_time_offset)
        self.clip = options.get("clip_sample", False)
        self.clip_range = float(options.get("clip_sample_range", 1.0))
        self.variance = options.get("variance", "fixed_small")
        self.table = (mean_coefficients(schedule, steps, self.variance, options.get("timestep_spacing", "leading"),
                                        options.get("steps_offset", 0)) if self.form == "mean" else None)

    def sampler_options(self, options: dict) -> dict:
        """The sampler's options with its own clipping off: the wrapper clipped already."""
        return {**options, "clip_sample": False} if self.clip else options

    def gradient(self, x: np.ndarray, n: np.ndarray) -> np.ndarray:
        y = np.ascontiguousarray(np.broadcast_to(self.labels, (x.shape[0],)))
        return self.classifier.infer({"x": np.ascontiguousarray(x, dtype=np.float32),
                                      "t": n.astype(np.float32), "y": y})["grad"]

    def steps_of(self, t: np.ndarray) -> np.ndarray:
        n = np.asarray(t, dtype=np.float64) - self.offset
        if not np.allclose(n, np.round(n)) or n.min() < 0 or n.max() >= self.abar.size:
            raise InvalidInput(f"classifier guidance needs integer training steps, the sampler asked for t = {t[:4]}")
        return np.round(n).astype(np.int64)

    def __call__(self, x: np.ndarray, t) -> dict[str, np.ndarray]:
        out = self.denoise(x, t)
        out = dict(out) if isinstance(out, dict) else {"eps": np.asarray(out)}
        if "eps" not in out:
            raise InvalidInput(f"classifier guidance needs a model that predicts eps; this one gives {sorted(out)}")
        n = self.steps_of(np.broadcast_to(np.asarray(t, dtype=np.float32), (x.shape[0],)))
        a = self.abar[n][:, None, None, None]                           # (B, 1, 1, 1) float64
        eps = out["eps"].astype(np.float64)
        if self.clip:                      # x̂0 clipped before the correction, as guided-diffusion does
            x0 = np.clip((x - np.sqrt(1.0 - a) * eps) / np.sqrt(a), -self.clip_range, self.clip_range)
            eps = (x - np.sqrt(a) * x0) / np.sqrt(1.0 - a)
        g = self.scale * self.gradient(x, n).astype(np.float64)         # (B, C, H, W)
        if self.form == "score":
            eps = eps - np.sqrt(1.0 - a) * g
        else:
            eps = eps - self.mean_shift(n, out.get("var")) * g
        out["eps"] = eps.astype(x.dtype)
        return out

    def mean_shift(self, n: np.ndarray, var_out) -> np.ndarray:
        """k_n·Σ_n per sample (B, 1, 1, 1), or per element for learned_range (B, C, H, W)."""
        rows = [self.table.get(int(s)) for s in n]
        if any(r is None for r in rows):
            raise InvalidInput(f"step {n.tolist()} is not on this ddpm sampler's grid")
        k = np.array([r[0] for r in rows])[:, None, None, None]
        if self.variance == "learned_range":
            if var_out is None:
                raise InvalidInput("variance learned_range needs the model's var output")
            log_beta = np.array([r[1] for r in rows])[:, None, None, None]
            log_post = np.array([r[2] for r in rows])[:, None, None, None]
            frac = (var_out.astype(np.float64) + 1.0) * 0.5
            return k * np.exp(frac * log_beta + (1.0 - frac) * log_post)
        return k * np.array([r[3] for r in rows])[:, None, None, None]
