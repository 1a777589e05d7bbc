"""Prediction types (ε, x0, v) in every VP sampler: step-for-step parity with diffusers'
schedulers at prediction_type sample / v_prediction, and, for the samplers diffusers lacks,
the same trajectory from an ε model and its exact x0 / v rewrites. The lucidrains
GaussianDiffusion loops are matched in test_lucid_sampling.py."""

import numpy as np
import pytest

from edgediff.runtime.samplers import SAMPLERS, init_noise_sigma, sample
from edgediff.runtime.schedules import Schedule
from edgediff.runtime.solvers import predict

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
SHAPE = (2, 3, 8, 8)
TOL = 1e-5
OUTPUT = {"sample": "x0", "v_prediction": "v"}


def fake_out(x, t):
    """A bounded nonlinear 'model' (an x0 or v guess) of (x, t), the same for both sides."""
    t = np.asarray(t, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return np.tanh(0.5 * x - np.roll(x, 2, axis=-2) * 0.2 + t / 1000 - 0.5).astype(x.dtype)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def trajectory(name, denoise, x_T, schedule, steps, noise=None, **options):
    xs = []
    sample(name, denoise, x_T, schedule, steps, noise=noise, callback=lambda info: xs.append(info["x"].copy()),
           **options)
    return xs


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
@pytest.mark.parametrize("name,cls_name", [("ddpm", "DDPMScheduler"), ("ddim", "DDIMScheduler"),
                                           ("dpmpp_2m", "DPMSolverMultistepScheduler"),
                                           ("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
@pytest.mark.parametrize("steps", [10, 25])
def test_x0_and_v_prediction_match_diffusers(name, cls_name, prediction, steps):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = getattr(diffusers, cls_name)(**LINEAR, prediction_type=prediction)
    ref.set_timesteps(steps)
    schedule = Schedule.from_config({**LINEAR, "prediction_type": prediction})
    x_T = (np.random.default_rng(1).standard_normal(SHAPE) * init_noise_sigma(name, schedule, steps)).astype(np.float32)
    gen = torch.Generator().manual_seed(7)
    draws = {i: torch.randn(SHAPE, generator=gen).numpy() for i, t in enumerate(ref.timesteps) if t > 0}
    x, ref_xs, gen = torch.from_numpy(x_T.copy()), [], torch.Generator().manual_seed(7)
    for t in ref.timesteps:
        out = torch.from_numpy(fake_out(ref.scale_model_input(x, t).numpy(), np.full(SHAPE[0], float(t))))
        kw = {"generator": gen} if name == "ddpm" else {}
        x = ref.step(out, t, x, **kw).prev_sample
        ref_xs.append(x.numpy().copy())
    xs = trajectory(name, lambda x, t: {OUTPUT[prediction]: fake_out(x, t)}, x_T, schedule, steps,
                    noise=lambda i, shape: draws[i])
    if name == "heun":  # diffusers' odd steps are the Euler predictions inside a Heun step
        ref_xs = ref_xs[1::2] + ref_xs[-1:]
    errs = [rel(a, b) for a, b in zip(xs, ref_xs)]
    # Heun's corrector of an x0 model divides x - x0 by the next sigma (0.03 at the end), and
    # this fake x0 is far from x: both sides' float32 roundings grow 1e2x there (measured 6.8e-5)
    tol = 1e-4 if (name, prediction) == ("heun", "sample") else TOL
    assert len(xs) == len(ref_xs) == steps and max(errs) <= tol, errs


def fake_eps(x, t):
    t = np.asarray(t, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return (np.tanh(0.7 * x + 0.3 * np.roll(x, 1, axis=-1)) * (0.6 + t / 2000) + 0.2 * np.sin(t / 150)).astype(x.dtype)


def rewritten(prediction, marginal):
    """The ε model rewritten exactly (float64) as an x0 or v model at the marginal the sampler
    assumes at model time t: x0 = (x - sigma·eps)/alpha, v = alpha·eps - sigma·x0."""
    def denoise(x, t):
        alpha, sigma = marginal(float(t[0]))
        eps, x64 = fake_eps(x, t).astype(np.float64), x.astype(np.float64)
        x0 = (x64 - sigma * eps) / alpha
        out = x0 if prediction == "sample" else alpha * eps - sigma * x0
        return {OUTPUT[prediction]: out.astype(x.dtype)}
    return denoise


def discrete_marginal(schedule):       # steps, fractional ones by the VE sigma interpolated (diffusers)
    def marginal(t):
        sig = np.interp(t, np.arange(schedule.num_train_timesteps), schedule.sigmas)
        return 1.0 / np.sqrt(sig**2 + 1.0), sig / np.sqrt(sig**2 + 1.0)
    return marginal


def continuous_marginal(schedule):     # the sampler's own continuous view of the model time
    def marginal(t):
        if schedule.kind == "discrete":
            u = (t - schedule.model_time_offset + 1.0) / schedule.num_train_timesteps
        else:
            u = t / schedule.model_time_scale
        a, s = schedule.alpha_sigma(u)
        return float(a), float(s)
    return marginal


CASES = [("ddpm", LINEAR, discrete_marginal, {}), ("ddim", LINEAR, discrete_marginal, {"eta": 0.5}),
         ("dpmpp_2m", LINEAR, discrete_marginal, {}), ("euler", LINEAR, discrete_marginal, {}),
         ("heun", LINEAR, discrete_marginal, {}),
         ("dpm_solver", LINEAR, continuous_marginal, {}),
         ("dpm_solver", {"type": "vp_continuous"}, continuous_marginal, {}),
         ("euler_maruyama", {"type": "vp_continuous"}, continuous_marginal, {})]


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
@pytest.mark.parametrize("name,cfg,marginal,options", CASES)
def test_every_vp_sampler_reads_x0_and_v_models(name, cfg, marginal, options, prediction):
    """Same trajectory from the ε model and its rewrite: x0 rewrites lose float32 digits where
    sigma is small (eps = (x - alpha·x0)/sigma), hence 1e-4 for them."""
    schedule = Schedule.from_config(cfg)
    steps = 12
    x_T = (np.random.default_rng(2).standard_normal(SHAPE) * init_noise_sigma(name, schedule, steps)).astype(np.float32)
    draws = np.random.default_rng(5).standard_normal((steps,) + SHAPE).astype(np.float32)
    noise = lambda i, shape: draws[i]                                              # noqa: E731
    ref = trajectory(name, fake_eps, x_T, schedule, steps, noise, **options)
    xs = trajectory(name, rewritten(prediction, marginal(schedule)), x_T, schedule, steps, noise, **options)
    errs = [rel(a, b) for a, b in zip(xs, ref)]
    assert max(errs) <= (1e-4 if prediction == "sample" else TOL), errs
    assert {s for s, *_ in CASES} == {n for n, s in SAMPLERS.items() if set(s.schedules) & {"discrete", "vp_continuous"}}


def test_predict_is_the_only_conversion_and_stable_at_high_noise():
    """v at alpha = 1e-4 (lucid's sigmoid schedule ends there): x0 = alpha·x - sigma·v exactly,
    where going through eps (x0 = (x - sigma·eps)/alpha) would cancel catastrophically."""
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    alpha = 1e-4
    sigma = float(np.sqrt(1 - alpha**2))
    eps, x0 = predict({"v": v}, x, alpha, sigma)
    want = alpha * x.astype(np.float64) - sigma * v.astype(np.float64)
    assert rel(x0, want) < 1e-6 and rel(eps, sigma * x.astype(np.float64) + alpha * v) < 1e-6
    through_eps = (x - np.float32(sigma) * eps) / np.float32(alpha)
    assert rel(through_eps, want) > 1e-4                        # why samplers take x0 from predict
    e, none = predict(np.ones_like(x), x, alpha, sigma)          # eps models: the sampler derives x0
    assert none is None and np.array_equal(e, np.ones_like(x))
    e, x0 = predict({"x0": x}, x, 0.6, 0.8)
    assert np.array_equal(x0, x) and rel(e, (x - 0.6 * x) / 0.8) < 1e-6


def _manifest(prediction, outputs, schema, **extra):
    from edgediff.runtime.manifest import Manifest

    x = {"dtype": "float32", "shape": ["batch", 1, 8, 8]}
    return Manifest.from_dict({
        "family": "lucid", "config": {}, "inputs": {"x": x, "t": {"dtype": "float32", "shape": ["batch"]}, **extra},
        "outputs": {n: x for n in outputs}, "prediction": prediction, "time": {},
        "schedule": {"num_train_timesteps": 100, "beta_schedule": "sigmoid"}, "sample_shape": [1, 8, 8],
        "models": {"fp32": "model.onnx"}, "schema_version": schema})


def test_v_output_means_v_prediction_from_schema_2_and_variance_in_schema_1():
    from edgediff.runtime.manifest import ManifestError

    m = _manifest("v_prediction", ["v"], 2, x_self_cond={"dtype": "float32", "shape": ["batch", 1, 8, 8]})
    assert m.output_names == ["v"] and m.graph_outputs == {} and m.input_names[-1] == "x_self_cond"
    legacy = _manifest("epsilon", ["eps", "v"], 1)               # DiT's variance output, schema 1
    assert legacy.output_names == ["eps", "var"] and legacy.graph_outputs == {"var": "v"}
    with pytest.raises(ManifestError, match="prediction must be one of epsilon, ddm_c_eps"):
        _manifest("v_prediction", ["v"], 1)                     # schema 1 had no v-prediction
    with pytest.raises(ManifestError, match="needs output"):
        _manifest("sample", ["eps"], 2)
    assert _manifest("sample", ["x0"], 2).noise_schedule.betas.size == 100
