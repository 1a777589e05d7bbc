"""lucidrains' GaussianDiffusion sampling, step by step: the runtime's ``ddpm`` (its
p_sample_loop) and ``ddim`` with ``timestep_spacing="lucid"`` and the clipped-x0 noise (its
ddim_sample, eta 0 and > 0) against the plain transcription in official_lucid_diffusion.py,
for pred_noise / pred_x0 / pred_v × linear / cosine / sigmoid, with and without
self-conditioning (the runtime's SelfConditioned wrapper), same fake model, recorded noise."""

import itertools

import numpy as np
import pytest

from edgediff.runtime.samplers import sample
from edgediff.runtime.schedules import Schedule, spaced_timesteps
from edgediff.runtime.self_cond import SelfConditioned

torch = pytest.importorskip("torch")
official = pytest.importorskip("official_lucid_diffusion")

T, DDIM_STEPS, TOL = 100, 13, 1e-5
OUTPUT = {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}


def schedule_config(name: str) -> dict:
    """How a lucid bundle records each GaussianDiffusion schedule."""
    if name == "linear":
        return {"num_train_timesteps": T, "beta_schedule": "linear", "beta_start": 1000 / T * 1e-4,
                "beta_end": 1000 / T * 0.02}
    return {"num_train_timesteps": T, "beta_schedule": {"cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}[name]}


class FakeUnet(torch.nn.Module):
    """Deterministic and nonlinear in x, t and the self-conditioning input (zeros when None,
    as upstream's Unet)."""

    def __init__(self, self_condition: bool):
        super().__init__()
        self.self_condition = self_condition
        self.w = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(3))

    def forward(self, x, t, x_self_cond=None):
        tt = t.float()[:, None, None, None] / T
        out = 0.6 * torch.tanh(x) * torch.cos(2.0 * tt) + 0.3 * self.w * torch.sin(3.0 * tt + 0.5)
        if self.self_condition:
            cond = torch.zeros_like(x) if x_self_cond is None else x_self_cond
            out = out + 0.4 * torch.tanh(cond + 0.2 * x)
        return out


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("objective,beta,self_cond", list(itertools.product(OUTPUT, ("linear", "cosine", "sigmoid"),
                                                                         (False, True))))
@pytest.mark.parametrize("loop,eta", [("p_sample_loop", 0.0), ("ddim_sample", 0.0), ("ddim_sample", 0.7)])
def test_runtime_follows_gaussian_diffusion_step_by_step(objective, beta, self_cond, loop, eta):
    model = FakeUnet(self_cond)
    draws = torch.randn(T + 1, 2, 1, 6, 6, generator=torch.Generator().manual_seed(11))
    ref_diff = official.Diffusion(model, objective, beta, T, self_cond)
    ref = (ref_diff.p_sample_loop(lambda k: draws[k]) if loop == "p_sample_loop"
           else ref_diff.ddim_sample(DDIM_STEPS, eta, lambda k: draws[k]))

    def denoise(x, t, **extra):
        cond = extra.get("x_self_cond")
        with torch.no_grad():
            out = model(torch.from_numpy(x), torch.from_numpy(t), None if cond is None else torch.from_numpy(cond))
        return {OUTPUT[objective]: out.numpy()}

    schedule = Schedule.from_config({**schedule_config(beta), "prediction_type": {
        "pred_noise": "epsilon", "pred_x0": "sample", "pred_v": "v_prediction"}[objective]})
    xs = []
    d = SelfConditioned(denoise, schedule) if self_cond else denoise
    common = dict(noise=lambda i, shape: draws[i + 1].numpy(), clip_sample=True,
                  callback=lambda info: xs.append(info["x"].copy()))
    if loop == "p_sample_loop":
        sample("ddpm", d, draws[0].numpy(), schedule, T, variance="fixed_small", **common)
    else:
        sample("ddim", d, draws[0].numpy(), schedule, DDIM_STEPS, eta=eta, timestep_spacing="lucid",
               use_clipped_model_output=True, **common)
    assert len(xs) == len(ref) == (T if loop == "p_sample_loop" else DDIM_STEPS)
    errs = [rel(a, b.numpy()) for a, b in zip(xs, ref)]
    assert max(errs) <= TOL, errs


@pytest.mark.parametrize("beta", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("n", [50, 100, 1000, 777])
def test_schedules_are_gaussian_diffusions(beta, n):
    """float64 betas equal to the last bit or two (the formulas are the same, the operation
    order is not)."""
    cfg = {**schedule_config(beta), "num_train_timesteps": n}
    if beta == "linear":
        cfg.update(beta_start=1000 / n * 1e-4, beta_end=1000 / n * 0.02)
    ours = Schedule.from_config(cfg).betas
    ref = official.betas_for(beta, n).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-11, atol=2e-15)


def test_lucid_ddim_grid_is_torch_linspace_truncated():
    for n, steps in [(1000, s) for s in range(1, 1000, 7)] + [(777, 50), (100, 13), (250, 37), (10, 9)]:
        grid = list(reversed(torch.linspace(-1, n - 1, steps=steps + 1).int().tolist()))[:-1]
        assert spaced_timesteps(n, steps, "lucid").tolist() == grid, (n, steps)
    with pytest.raises(ValueError, match="ddpm and ddim"):
        spaced_timesteps(100, 10, "lucid", extended=True)
