"""Schedules: float64 maths, diffusers-compatible betas and timestep spacings, time maps."""

import math
import subprocess
import sys

import numpy as np
import pytest

from edgediff.runtime.schedules import (SCHEDULE_KINDS, DDMConstantSchedule, DiscreteSchedule,
                                        Schedule, VPContinuousSchedule, VPSchedule,
                                        spaced_timesteps)

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
    for bad in ({"prediction_type": "velocity"}, {"use_karras_sigmas": True},
                {"thresholding": True}, {"beta_schedule": "sigmoid2"}, {"type": "edm"}):
        with pytest.raises(ValueError):
            Schedule.from_config({**LINEAR, **bad})


def test_trained_betas():
    betas = np.linspace(1e-4, 0.02, 10)
    s = Schedule.from_config({"trained_betas": betas.tolist()})
    assert s.num_train_timesteps == 10
    np.testing.assert_array_equal(s.betas, betas)


KIND_CONFIGS = {"discrete": LINEAR, "vp_continuous": {"type": "vp_continuous"},
                "ddm_constant": {"type": "ddm_constant"}}


def test_registry_lists_exactly_the_kinds():
    assert SCHEDULE_KINDS == {"discrete": DiscreteSchedule, "vp_continuous": VPContinuousSchedule,
                              "ddm_constant": DDMConstantSchedule}
    for kind, cls in SCHEDULE_KINDS.items():
        assert cls.kind == kind and issubclass(cls, Schedule)
    assert issubclass(DiscreteSchedule, VPSchedule) and issubclass(VPContinuousSchedule, VPSchedule)
    assert not issubclass(DDMConstantSchedule, VPSchedule)
    with pytest.raises(TypeError):  # the base and the VP base are abstract
        Schedule(t_min=0.1, t_max=1.0)
    with pytest.raises(TypeError):
        VPSchedule(t_min=0.1, t_max=1.0)


@pytest.mark.parametrize("kind", list(SCHEDULE_KINDS))
def test_from_config_dispatches_through_the_registry(kind):
    s = Schedule.from_config(KIND_CONFIGS[kind])
    assert type(s) is SCHEDULE_KINDS[kind] and s.kind == kind
    # on a kind's class, ``type`` defaults to that kind; any other kind is refused
    assert type(SCHEDULE_KINDS[kind].from_config({})) is SCHEDULE_KINDS[kind]
    other = next(k for k in SCHEDULE_KINDS if k != kind)
    with pytest.raises(ValueError, match=f"got a {other} schedule config"):
        SCHEDULE_KINDS[kind].from_config({"type": other})
    if kind != "ddm_constant":
        assert type(VPSchedule.from_config(KIND_CONFIGS[kind])) is SCHEDULE_KINDS[kind]


def test_from_config_errors_and_default_kind():
    assert type(Schedule.from_config({})) is DiscreteSchedule
    for bad in ("edm", None, ["discrete"]):
        with pytest.raises(ValueError, match="is not one of .'discrete', 'vp_continuous', "
                                             "'ddm_constant'.") as info:
            Schedule.from_config({"type": bad})
        assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="got a ddm_constant schedule config"):
        VPSchedule.from_config({"type": "ddm_constant"})
    with pytest.raises(ValueError, match="prediction_type"):
        Schedule.from_config({"type": "ddm_constant", "prediction_type": "sample"})


def test_each_kind_reads_only_its_own_keys():
    # a key of another kind has no effect here, so it is reported as ignored
    s = Schedule.from_config({**LINEAR, "sigma_max": 0.5, "beta_max": 10})
    assert set(s.ignored_keys) == {"sigma_max", "beta_max"} and s.t_max == 1.0
    s = Schedule.from_config({"type": "vp_continuous", "eps": 1e-3, "model_time_offset": 1})
    assert s.ignored_keys == ("model_time_offset",) and s.t_min == 1e-3
    s = Schedule.from_config({"type": "ddm_constant", "eps": 1e-4, "sigma_min": 0.02,
                              "sigma_max": 0.5, "clip_sample": True})
    assert s.ignored_keys == () and s.sampler_defaults == {"clip_sample": True}
    assert (s.t_min, s.t_max) == (pytest.approx(4e-4), 0.5)


def test_marginal_matches_each_kinds_forward_process():
    s = Schedule.from_config(LINEAR)
    knots = np.arange(1, 1001) / 1000  # continuous t of step n is (n+1)/N
    signal, noise = s.marginal(knots)
    assert signal.dtype == np.float64 and noise.dtype == np.float64
    np.testing.assert_allclose(signal, np.sqrt(s.alphas_cumprod), rtol=1e-12)
    np.testing.assert_allclose(noise, np.sqrt(1 - s.alphas_cumprod), rtol=1e-12)
    for kind in ("discrete", "vp_continuous"):
        s = Schedule.from_config(KIND_CONFIGS[kind])
        t = np.linspace(s.t_min, s.t_max, 41)
        signal, noise = s.marginal(t)
        np.testing.assert_allclose(signal**2 + noise**2, 1.0, rtol=1e-12)
        np.testing.assert_array_equal(signal, s.alpha_sigma(t)[0])
        np.testing.assert_array_equal(noise, s.alpha_sigma(t)[1])
    s = Schedule.from_config({"type": "vp_continuous"})
    np.testing.assert_allclose(s.marginal(0.5)[0], np.exp(-0.25 * 0.25 * 19.9 - 0.25 * 0.1),
                               rtol=1e-14)
    s = Schedule.from_config({"type": "ddm_constant"})
    t = np.linspace(s.t_min, s.t_max, 41)
    signal, noise = s.marginal(t)  # x_t = x0 - x0·t + sqrt(t)·eps
    assert signal.dtype == np.float64 and noise.dtype == np.float64
    np.testing.assert_array_equal(signal, 1.0 - t)
    np.testing.assert_array_equal(noise, np.sqrt(t))
    assert s.marginal(1.0) == (0.0, 1.0)


def test_model_time_maps_per_kind():
    s = Schedule.from_config({**LINEAR, "model_time_offset": 1})
    assert s.model_time(5).dtype == np.float64 and s.model_time(5) == 6.0
    assert s.continuous_model_time(0.5) == 500.0
    s = Schedule.from_config({"type": "vp_continuous", "model_time_scale": 1000})
    assert s.model_time(0.5) == s.continuous_model_time(0.5) == 500.0
    s = Schedule.from_config({"type": "ddm_constant"})
    assert s.model_time(0.25) == s.continuous_model_time(0.25) == 0.25
    assert s.model_time([0.5]).dtype == np.float64


def test_kind_only_methods_raise_requires_error():
    ddm = Schedule.from_config({"type": "ddm_constant"})
    for name in ("log_alpha", "alpha_sigma", "marginal_lambda", "inverse_lambda"):
        with pytest.raises(ValueError, match="needs a discrete or vp_continuous schedule, "
                                             "got ddm_constant"):
            getattr(ddm, name)(0.5)
    for s in (ddm, Schedule.from_config(LINEAR)):
        with pytest.raises(ValueError, match=f"needs a vp_continuous schedule, got {s.kind}"):
            s.beta_t(0.5)
    with pytest.raises(ValueError, match="needs a discrete schedule, got ddm_constant"):
        ddm.require("discrete")
    ddm.require("discrete", "ddm_constant")
    assert ddm.num_train_timesteps is None and not hasattr(ddm, "alphas_cumprod")


def test_direct_construction_and_config_round_trip():
    betas = np.linspace(1e-4, 0.02, 50)
    built = [DiscreteSchedule(betas, model_time_offset=1), VPContinuousSchedule(0.2, 15.0),
             DDMConstantSchedule(t_min=4e-4, t_max=0.5)]
    for s in built:
        again = Schedule.from_config(s.to_config())
        assert type(again) is type(s) and repr(again) == repr(s) and again.ignored_keys == ()
        t = np.linspace(s.t_min, s.t_max, 9)
        np.testing.assert_allclose(again.marginal(t), s.marginal(t), rtol=1e-15)
        np.testing.assert_array_equal(again.continuous_model_time(t), s.continuous_model_time(t))
    assert repr(built[0]) == "DiscreteSchedule(N=50, offset=1)"
    assert repr(built[2]) == "DDMConstantSchedule(t in [0.0004, 0.5])"
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule([0.5])


def test_a_new_kind_is_one_class_and_one_registry_line(monkeypatch):
    class FlowSchedule(Schedule):  # rectified flow: x_t = (1 - t)·x0 + t·eps
        kind = "flow"
        config_keys = frozenset({"shift"})

        @classmethod
        def from_kind_config(cls, cfg, **common):
            return cls(t_min=0.0, t_max=1.0, **common)

        def marginal(self, t):
            t = np.asarray(t, dtype=np.float64)
            return 1.0 - t, t

        def model_time(self, t):
            return np.asarray(t, dtype=np.float64) * 1000

    monkeypatch.setitem(SCHEDULE_KINDS, "flow", FlowSchedule)
    s = Schedule.from_config({"type": "flow", "shift": 3, "beta_min": 0.1})
    assert type(s) is FlowSchedule and s.ignored_keys == ("beta_min",)
    assert s.continuous_model_time(0.5) == 500.0 and s.marginal(0.25) == (0.75, 0.25)
    with pytest.raises(ValueError, match="needs a discrete or vp_continuous schedule, got flow"):
        s.alpha_sigma(0.5)


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
