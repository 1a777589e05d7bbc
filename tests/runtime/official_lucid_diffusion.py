"""An independent, deliberately plain transcription of the sampling loops of lucidrains'
``GaussianDiffusion``, the reference of the runtime's lucid sampling test.

Source: lucidrains/denoising-diffusion-pytorch at commit
faed4db28e724735323fa91c70aa9b28a6e1cbac, file
``denoising_diffusion_pytorch/denoising_diffusion_pytorch.py``: the three beta schedules,
``model_predictions`` (pred_noise / pred_x0 / pred_v, clipping of x_start), ``p_sample_loop``
(ancestral, posterior variance, x_start clamped) and ``ddim_sample`` (the int(linspace(-1,
T-1, S+1)) grid, eta, noise re-derived from the clipped x_start), with self-conditioning fed
the previous x_start. Written anew, torch float32 buffers as upstream registers them; it
imports nothing from edgediff.

Checked once, outside the test suite: the upstream module itself (imported from the mirror
with einops, torchvision, ema_pytorch and accelerate stubbed, none of them on the sampling
path) against edgediff's samplers with the same fake model and recorded noise, T = 1000,
every objective x schedule x self_condition, p_sample_loop (1000 steps) and ddim_sample
(50 steps; eta 0 and 0.7): worst per-step rel-L2 1.04e-6; T = 250, 37 DDIM steps: 9.3e-7.

Noise enters through ``draw(i)``: index 0 is x_T, then one draw per step that adds noise
(p_sample_loop: every step but t = 0; ddim_sample: every step but the last), as upstream's
``torch.randn`` / ``torch.randn_like`` calls come.
"""
from __future__ import annotations

import math

import torch


def betas_for(name: str, T: int) -> torch.Tensor:
    """float64 betas of upstream's linear / cosine / sigmoid schedules."""
    if name == "linear":
        k = 1000 / T
        return torch.linspace(k * 1e-4, k * 0.02, T, dtype=torch.float64)
    s = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
    if name == "cosine":
        abar = torch.cos((s + 0.008) / 1.008 * math.pi * 0.5) ** 2
    elif name == "sigmoid":
        lo, hi = torch.tensor(-3.0).sigmoid(), torch.tensor(3.0).sigmoid()     # float32 scalars, as upstream
        abar = (hi - (s * 6.0 - 3.0).sigmoid()) / (hi - lo)
    else:
        raise ValueError(name)
    abar = abar / abar[0]
    return torch.clip(1 - abar[1:] / abar[:-1], 0, 0.999)


class Diffusion:
    """The buffers and loops of GaussianDiffusion that sampling uses."""

    def __init__(self, model, objective: str, schedule: str, T: int, self_condition: bool):
        self.model, self.objective, self.T, self.self_condition = model, objective, T, self_condition
        b = betas_for(schedule, T)
        ac = torch.cumprod(1 - b, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        f = lambda v: v.float()                                              # noqa: E731
        self.ac = f(ac)
        self.sqrt_ac, self.sqrt_1m_ac = f(ac.sqrt()), f((1 - ac).sqrt())
        self.recip, self.recipm1 = f((1 / ac).sqrt()), f((1 / ac - 1).sqrt())
        post_var = b * (1 - ac_prev) / (1 - ac)
        self.post_logvar = f(post_var.clamp(min=1e-20).log())
        self.c1 = f(b * ac_prev.sqrt() / (1 - ac))
        self.c2 = f((1 - ac_prev) * (1 - b).sqrt() / (1 - ac))

    def _at(self, buf, t, x):
        return buf[t].reshape(-1, *([1] * (x.dim() - 1)))

    def predictions(self, x, t, cond, clip: bool, rederive: bool):
        """(noise, x_start) of one model call, as model_predictions."""
        out = self.model(x, t, cond)
        at = lambda buf: self._at(buf, t, x)                                  # noqa: E731
        if self.objective == "pred_noise":
            x0 = at(self.recip) * x - at(self.recipm1) * out
            if clip:
                x0 = x0.clamp(-1, 1)
            noise = (at(self.recip) * x - x0) / at(self.recipm1) if clip and rederive else out
            return noise, x0
        x0 = out if self.objective == "pred_x0" else at(self.sqrt_ac) * x - at(self.sqrt_1m_ac) * out
        if clip:
            x0 = x0.clamp(-1, 1)
        return (at(self.recip) * x - x0) / at(self.recipm1), x0

    @torch.no_grad()
    def p_sample_loop(self, draw) -> list[torch.Tensor]:
        """x after each of the T ancestral steps."""
        x, x0, out, k = draw(0), None, [], 1
        for step in range(self.T - 1, -1, -1):
            t = torch.full((x.shape[0],), step, dtype=torch.long)
            _, x0 = self.predictions(x, t, x0 if self.self_condition else None, clip=False, rederive=False)
            x0 = x0.clamp(-1, 1)
            mean = self._at(self.c1, t, x) * x0 + self._at(self.c2, t, x) * x
            if step > 0:
                x = mean + (0.5 * self._at(self.post_logvar, t, x)).exp() * draw(k)
                k += 1
            else:
                x = mean
            out.append(x)
        return out

    @torch.no_grad()
    def ddim_sample(self, steps: int, eta: float, draw) -> list[torch.Tensor]:
        """x after each of the ``steps`` DDIM steps."""
        grid = list(reversed(torch.linspace(-1, self.T - 1, steps=steps + 1).int().tolist()))
        x, x0, out, k = draw(0), None, [], 1
        for now, nxt in zip(grid[:-1], grid[1:]):
            t = torch.full((x.shape[0],), now, dtype=torch.long)
            noise, x0 = self.predictions(x, t, x0 if self.self_condition else None, clip=True, rederive=True)
            if nxt < 0:
                x = x0
            else:
                a, a_next = self.ac[now], self.ac[nxt]
                sigma = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
                x = x0 * a_next.sqrt() + (1 - a_next - sigma ** 2).sqrt() * noise + sigma * draw(k)
                k += 1
            out.append(x)
        return out
