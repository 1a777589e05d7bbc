"""Schedules: float64 maths, diffusers-compatible betas and timestep spacings, time maps."""

import math
import subprocess
import sys

import numpy as np
import pytest

from edgediff.runtime.schedules import Schedule, spaced_timesteps

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
          "beta_end": 0.02}


def test_runtime_sampling_modules_import_without_torch():
    code = ("import sys; import edgediff.runtime.schedules, edgediff.runtime.samplers, "
            "edgediff.runtime.solvers; bad = [m for m in ('torch', 'edgediff.export', "
            "'edgediff.calibration') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("beta_schedule,start,end", [
    ("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_betas_match_diffusers(beta_schedule, start, end):
    diffusers = pytest.importorskip("diffusers")
    cfg = {"num_train_timesteps": 1000, "beta_schedule": beta_schedule,
           "beta_start": start, "beta_end": end}
    ref = diffusers.DDPMScheduler(**cfg)
    s = Schedule.from_config(cfg)
    assert s.betas.dtype == np.float64 and s.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(s.betas, ref.betas.double().numpy(), rtol=2e-6)
    # diffusers accumulates the product in float32 (1 - 0.999 loses digits at the cosine cap)
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_discrete_quantities_are_consistent_float64():
    s = Schedule.from_config(LINEAR)
    # DiT's get_named_beta_schedule("linear", 1000): np.linspace(1e-4, 0.02, 1000) in float64
    np.testing.assert_array_equal(s.betas, np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas), rtol=1e-15)
    ac = s.alphas_cumprod
    np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ac) / ac), rtol=1e-14)
    np.testing.assert_allclose(s.lambdas, 0.5 * np.log(ac / (1 - ac)), rtol=1e-12)
    assert s.model_time(5) == 5.0 and s.num_train_timesteps == 1000


def test_discrete_continuous_view_follows_dpm_solver():
    s = Schedule.from_config(LINEAR)
    n = 1000
    knots = np.arange(1, n + 1) / n  # NoiseScheduleVP('discrete'): t_n = (n+1)/N
    np.testing.assert_allclose(s.log_alpha(knots), 0.5 * np.log(s.alphas_cumprod), rtol=1e-12)
    a, sg = s.alpha_sigma(knots)
    np.testing.assert_allclose(a**2 + sg**2, 1.0, rtol=1e-12)
    t = np.linspace(1.0 / n, 1.0, 37)
    np.testing.assert_allclose(s.inverse_lambda(s.marginal_lambda(t)), t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.continuous_model_time([1.0 / n, 1.0]), [0.0, 999.0])
    uvit = Schedule.from_config({**LINEAR, "model_time_offset": 1})  # U-ViT latent: n = t·N
    np.testing.assert_allclose(uvit.continuous_model_time([1.0 / n, 0.5, 1.0]),
                               [1.0, 500.0, 1000.0])


def test_vp_continuous_is_the_score_sde_vp():
    s = Schedule.from_config({"type": "vp_continuous", "beta_min": 0.1, "beta_max": 20})
    t = np.linspace(1e-4, 1.0, 50)
    # log alpha_t = -1/2 ∫_0^t beta(u) du with beta linear from 0.1 to 20
    integral = 0.1 * t + 0.5 * (20 - 0.1) * t**2
    np.testing.assert_allclose(s.log_alpha(t), -0.5 * integral, rtol=1e-13)
    a, sg = s.alpha_sigma(t)
    np.testing.assert_allclose(sg**2, -np.expm1(-integral), rtol=1e-12)
    np.testing.assert_allclose(s.inverse_lambda(s.marginal_lambda(t)), t, rtol=1e-10)
    np.testing.assert_allclose(s.model_time(t), 999 * t)  # U-ViT's ScoreModel: nnet(x, t*999)
    np.testing.assert_allclose(s.beta_t(t), 0.1 + t * 19.9)
    assert (s.t_min, s.t_max) == (1e-4, 1.0)


def test_ddm_constant_grid_ends():
    s = Schedule.from_config({"type": "ddm_constant"})
    assert s.kind == "ddm_constant" and math.isclose(s.t_min, 1e-4) and s.t_max == 1.0
    assert s.model_time(0.25) == 0.25
    with pytest.raises(ValueError):
        s.log_alpha(0.5)


def test_sampler_defaults_pinned_and_ignored_keys():
    cfg = {**LINEAR, "_class_name": "DDPMScheduler", "clip_sample": False, "variance_type":
           "learned_range", "timestep_spacing": "trailing", "prediction_type": "epsilon",
           "skip_prk_steps": True}
    s = Schedule.from_config(cfg)
    assert s.sampler_defaults == {"clip_sample": False, "variance": "learned_range",
                                  "timestep_spacing": "trailing"}
    assert set(s.ignored_keys) == {"_class_name", "skip_prk_steps"}
    assert s.to_config() == cfg
    for bad in ({"prediction_type": "v_prediction"}, {"use_karras_sigmas": True},
                {"thresholding": True}, {"beta_schedule": "sigmoid"}, {"type": "edm"}):
        with pytest.raises(ValueError):
            Schedule.from_config({**LINEAR, **bad})


def test_trained_betas():
    betas = np.linspace(1e-4, 0.02, 10)
    s = Schedule.from_config({"trained_betas": betas.tolist()})
    assert s.num_train_timesteps == 10
    np.testing.assert_array_equal(s.betas, betas)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 20, 50, 333, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_spaced_timesteps_match_diffusers(spacing, steps, offset):
    diffusers = pytest.importorskip("diffusers")
    cfg = {**LINEAR, "timestep_spacing": spacing, "steps_offset": offset}
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls(**cfg)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(spaced_timesteps(1000, steps, spacing, offset),
                                      ref.timesteps.numpy())
    for cls in (diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler):
        ref = cls(**cfg)
        ref.set_timesteps(steps)
        ours = spaced_timesteps(1000, steps, spacing, offset, continuous=True)
        ref_ts = ref.timesteps.numpy()
        if cls is diffusers.HeunDiscreteScheduler:  # [t0, t1, t1, t2, t2, ...]
            ref_ts = ref_ts[::2] if steps > 1 else ref_ts
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref_ts)
    if not (spacing == "leading" and steps >= 500):  # diffusers' leading grid collapses there
        ref = diffusers.DPMSolverMultistepScheduler(**cfg)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(spaced_timesteps(1000, steps, spacing, offset, extended=True),
                                      ref.timesteps.numpy())


def test_spaced_timesteps_rejects_bad_input():
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 10, "karras")
