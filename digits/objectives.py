"""Training losses, one per family, over the export view ``module(x, t, y) -> tuple``.

- ``epsilon``: DDPM's simple loss (Ho et al. 2020, Eq. 14): pick a step n uniformly,
  noise x0 to x_n = sqrt(abar_n)·x0 + sqrt(1 - abar_n)·eps, regress eps with MSE. Used by
  the DDPM U-Net and by U-ViT (discrete time: the model sees n + model_time_offset).
- ``hybrid``: improved DDPM's L_hybrid as DiT trains with learned sigma (Nichol & Dhariwal
  2021, Sec. 3.1): the same MSE on eps, plus the variational bound term of the sampled
  step, in which the predicted mean is computed from a detached eps, so the bound trains
  only the variance output v (log var = frac·log beta + (1 - frac)·log posterior var,
  frac = (v + 1)/2). L_vlb's 1/T-per-step estimate times lambda = 1e-3 times T = 1000
  gives weight 1 per sampled step (DiT: vb scaled by num_timesteps / 1000).
- ``lucid``: lucidrains' GaussianDiffusion.p_losses: the MSE of the pred_noise / pred_x0 /
  pred_v target weighted per step by 1 / snr / snr/(snr + 1); unconditional (``y`` unused).
- ``ddm``: the decoupled model (Huang et al. 2023, arXiv 2306.13720): t ~ U(eps, 1),
  x_t = x0 + c·t + sqrt(t)·eps with c = -x0, and the sum of the two regressions
  w_c·|c_pred - c|² + w_eps·|eps_pred - eps|² (means over pixels). The official pixel
  configs (weighting_loss: True) weight them as DDM-Public's ddm_const.py does,
  w_c = 1/t and w_eps = 1/(1 - t + eps), and add the reconstruction of x0 weighted by
  (1 - t)². The official LPIPS term is left out (it needs a pretrained ImageNet network;
  digits are one-channel 16×16).

Each loss takes ``(module, x0, y, gen)`` and returns a scalar tensor.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from edgediff.runtime.schedules import Schedule
from edgediff.runtime.errors import InvalidInput


class DiscreteSchedule:
    """The tensors an integer-step loss needs, from a bundle-style schedule dict."""

    def __init__(self, schedule: dict):
        sched = Schedule.from_config(schedule)
        sched.require("discrete")
        abar = sched.alphas_cumprod                                 # float64 (T,)
        abar_prev = np.append(1.0, abar[:-1])
        beta = 1.0 - abar / abar_prev
        post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)        # noqa: E731
        self.steps = abar.size
        self.offset = float(sched.model_time_offset)
        self.sqrt_abar, self.sqrt_1m_abar = f32(np.sqrt(abar)), f32(np.sqrt(1.0 - abar))
        self.log_beta = f32(np.log(beta))
        # step 0 has zero posterior variance; use step 1's, as improved DDPM does
        self.log_post = f32(np.log(np.append(post_var[1], post_var[1:])))
        self.coef_x0 = f32(beta * np.sqrt(abar_prev) / (1.0 - abar))
        self.coef_xt = f32((1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar))

    def noised(self, x0, gen):
        """(x_n, n, eps) for a uniformly drawn step n per sample."""
        n = torch.randint(0, self.steps, (x0.shape[0],), generator=gen)   # (B,)
        eps = torch.randn(x0.shape, generator=gen)                        # (B, C, H, W)
        x_t = _bcast(self.sqrt_abar[n]) * x0 + _bcast(self.sqrt_1m_abar[n]) * eps
        return x_t, n, eps

    def model_time(self, n):
        return n.to(torch.float32) + self.offset                            # (B,)


def _bcast(v):
    return v[:, None, None, None]                                         # (B,) -> (B, 1, 1, 1)


def _mean_flat(x):
    return x.flatten(1).mean(dim=1)                                       # (B, ...) -> (B,)


def epsilon_loss(sched: DiscreteSchedule):
    def loss(module, x0, y, gen):
        x_t, n, eps = sched.noised(x0, gen)
        pred = module(x_t, sched.model_time(n), y)[0]
        return ((pred - eps) ** 2).mean()
    return loss


def _gauss_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _decoder_nll(x0, mean, logvar):
    """-log P(x0) under N(mean, e^logvar) integrated over x0's 8-bit bin (width 2/255);
    the outermost bins extend to ±infinity. Elementwise, in nats."""
    inv_std = torch.exp(-0.5 * logvar)
    upper = inv_std * (x0 - mean + 1.0 / 255)
    lower = inv_std * (x0 - mean - 1.0 / 255)
    log_below_upper = torch.special.log_ndtr(upper)
    log_above_lower = torch.special.log_ndtr(-lower)
    mid = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return -torch.where(x0 < -0.999, log_below_upper, torch.where(x0 > 0.999, log_above_lower, mid))


def hybrid_loss(sched: DiscreteSchedule, vlb_weight: float = 1.0):
    def loss(module, x0, y, gen):
        x_t, n, eps = sched.noised(x0, gen)
        eps_pred, v = module(x_t, sched.model_time(n), y)[:2]
        mse = _mean_flat((eps_pred - eps) ** 2)                                # (B,)
        # the bound trains the variance only: the mean comes from a detached eps
        x0_pred = (x_t - _bcast(sched.sqrt_1m_abar[n]) * eps_pred.detach()) / _bcast(sched.sqrt_abar[n])
        mean = _bcast(sched.coef_x0[n]) * x0_pred + _bcast(sched.coef_xt[n]) * x_t
        frac = (v + 1.0) / 2.0
        logvar = frac * _bcast(sched.log_beta[n]) + (1.0 - frac) * _bcast(sched.log_post[n])
        true_mean = _bcast(sched.coef_x0[n]) * x0 + _bcast(sched.coef_xt[n]) * x_t
        kl = _mean_flat(_gauss_kl(true_mean, _bcast(sched.log_post[n]), mean, logvar))
        nll = _mean_flat(_decoder_nll(x0, mean, logvar))
        vb = torch.where(n == 0, nll, kl) / math.log(2.0)                      # bits per dim
        return (mse + vlb_weight * vb).mean()
    return loss


def ddm_loss(eps: float = 1e-4, weighting: bool = True):
    """DDM-Public ``ddm_const.py`` DDPM.p_losses (l2): C and noise regressed with weights
    1/t and 1/(1 - t + eps), plus the reconstruction x_rec = x_t - C_pred·t - sqrt(t)·eps_pred
    against x0 weighted by (1 - t)²."""
    def loss(module, x0, y, gen):
        b = x0.shape[0]
        t = torch.rand(b, generator=gen) * (1.0 - eps) + eps                  # (B,) in [eps, 1)
        noise = torch.randn(x0.shape, generator=gen)
        c = -x0
        x_t = x0 + c * _bcast(t) + _bcast(t.sqrt()) * noise
        c_pred, eps_pred = module(x_t, t, y)[:2]
        w_c = 1 / t if weighting else torch.ones_like(t)
        w_eps = 1 / (1 - t + eps) if weighting else torch.ones_like(t)
        simple = w_c * _mean_flat((c_pred - c) ** 2) + w_eps * _mean_flat((eps_pred - noise) ** 2)
        x_rec = x_t - c_pred * _bcast(t) - _bcast(t.sqrt()) * eps_pred
        rec = (1 - t) ** 2 * _mean_flat((x_rec - x0) ** 2)
        return simple.mean() + rec.mean()
    return loss


def lucid_loss(sched: DiscreteSchedule, objective: str, self_condition: bool = False):
    """lucidrains GaussianDiffusion.p_losses: the MSE of the objective's target (noise, x0 or
    v = sqrt(abar)·eps - sqrt(1 - abar)·x0), per sample times its loss_weight: 1, snr or
    snr/(snr + 1) (no min-SNR clamp, its default). With self-conditioning, half of the
    batches first predict x0 without gradient and condition on it, as upstream does."""
    snr = sched.sqrt_abar ** 2 / sched.sqrt_1m_abar ** 2
    weight = {"pred_noise": torch.ones_like(snr), "pred_x0": snr, "pred_v": snr / (snr + 1)}[objective]

    def x0_of(out, x_t, n):
        a, s = _bcast(sched.sqrt_abar[n]), _bcast(sched.sqrt_1m_abar[n])
        return {"pred_noise": lambda: (x_t - s * out) / a, "pred_x0": lambda: out,
                "pred_v": lambda: a * x_t - s * out}[objective]()

    def loss(module, x0, y, gen):
        x_t, n, eps = sched.noised(x0, gen)
        t = sched.model_time(n)
        extra = ()
        if self_condition:
            cond = torch.zeros_like(x_t)
            if torch.rand((), generator=gen) < 0.5:
                with torch.no_grad():
                    cond = x0_of(module(x_t, t, cond)[0], x_t, n)
            extra = (cond,)
        pred = module(x_t, t, *extra)[0]
        a, s = _bcast(sched.sqrt_abar[n]), _bcast(sched.sqrt_1m_abar[n])
        target = {"pred_noise": eps, "pred_x0": x0, "pred_v": a * eps - s * x0}[objective]
        return (_mean_flat((pred - target) ** 2) * weight[n]).mean()
    return loss


def objective_for(family: str, spec) -> callable:
    """The loss a family trains with, given its ModelSpec (for the schedule)."""
    if family in ("ddpm", "uvit", "dit"):
        sched = DiscreteSchedule(spec.schedule)
        return hybrid_loss(sched) if "var" in spec.outputs else epsilon_loss(sched)   # var: DiT's learned sigma
    if family == "lucid":
        return lucid_loss(DiscreteSchedule(spec.schedule), spec.extra["objective"],
                          "x_self_cond" in spec.inputs)
    if family in ("ddm", "ddm_cond"):
        return ddm_loss(eps=float(spec.schedule.get("eps", 1e-4)))
    raise InvalidInput(f"no training objective for family {family!r}")
