"""Samplers: step-for-step parity with diffusers' schedulers (torch is test-only here), DiT's
learned-range DDPM written out independently, DPM-Solver formulas, DDM and Euler-Maruyama
on a Gaussian toy whose exact answer is known, and the noise / callback / dtype contract."""

from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime.samplers import SAMPLERS, init_noise_sigma, model_calls, sample, sampler_table
from edgediff.runtime.schedules import Schedule, spaced_timesteps

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
          "beta_end": 0.02}
SHAPE = (2, 3, 8, 8)
TOL = 1e-5  # per-step rel-L2 gate against diffusers


def fake_eps(x, t):
    """A fixed nonlinear function of (x, t): the same 'model' for both sides."""
    t = np.asarray(t, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    y = np.tanh(0.7 * x + 0.3 * np.roll(x, 1, axis=-1)) * (0.6 + t / 2000) + 0.2 * np.sin(t / 150)
    return y.astype(x.dtype)


def fake_v(x, t):
    t = np.asarray(t, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return np.tanh(0.5 * x - np.roll(x, 2, axis=-2) * 0.2 + t / 1000 - 0.5).astype(x.dtype)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def run_ours(name, x_T, schedule, steps, noise=None, model=fake_eps, **options):
    xs, ts = [], []

    def denoise(x, t):
        assert t.dtype == np.float32 and t.shape == (x.shape[0],)
        ts.append(float(t[0]))
        return model(x, t)

    out = sample(name, denoise, x_T, schedule, steps, noise=noise,
                 callback=lambda info: xs.append(info["x"].copy()), **options)
    np.testing.assert_array_equal(out, xs[-1])
    return xs, ts


def run_diffusers(scheduler, x_T, model=fake_eps, step_noise=None, **step_kwargs):
    """diffusers' own loop; step_noise(i) feeds variance_noise where the step takes it."""
    import torch
    x, xs, ts = torch.from_numpy(x_T.copy()), [], []
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t).numpy()
        ts.append(float(t))
        out = torch.from_numpy(model(x_in, np.full(x.shape[0], float(t))))
        kw = dict(step_kwargs)
        if step_noise is not None:
            kw["variance_noise"] = torch.from_numpy(step_noise(i))
        x = scheduler.step(out, t, x, **kw).prev_sample
        xs.append(x.numpy().copy())
    return xs, ts


def x_T_for(scale, seed=1):
    return (np.random.default_rng(seed).standard_normal(SHAPE) * scale).astype(np.float32)


PARITY = [("ddpm", "DDPMScheduler"), ("ddim", "DDIMScheduler"),
          ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler"),
          ("heun", "HeunDiscreteScheduler")]


@pytest.mark.parametrize("name,cls_name", PARITY)
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                            ("linspace", 0)])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_matches_diffusers_step_for_step(name, cls_name, spacing, offset, steps):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = {**LINEAR, "timestep_spacing": spacing, "steps_offset": offset}
    ref = getattr(diffusers, cls_name)(**cfg)
    ref.set_timesteps(steps)
    schedule = Schedule.from_config(cfg)  # spacing/offset reach the sampler as defaults
    scale = init_noise_sigma(name, schedule, steps)
    assert scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    x_T = x_T_for(scale)
    # DDPM draws its noise inside step() whenever t > 0: replay those draws in order.
    gen = torch.Generator().manual_seed(7)
    draws = {i: torch.randn(SHAPE, generator=gen).numpy()
             for i, t in enumerate(ref.timesteps) if t > 0} if name == "ddpm" else {}
    kw = {"generator": torch.Generator().manual_seed(7)} if name == "ddpm" else {}
    ref_xs, ref_ts = run_diffusers(ref, x_T, **kw)
    xs, ts = run_ours(name, x_T, schedule, steps, noise=lambda i, shape: draws[i])
    assert ts == ref_ts  # same model inputs in time (Heun: 2·steps - 1 calls)
    if name == "heun":  # diffusers' odd steps are the Euler predictions inside a Heun step
        ref_xs = ref_xs[1::2] + ref_xs[-1:]
    assert len(xs) == len(ref_xs) == steps
    errs = [rel(a, b) for a, b in zip(xs, ref_xs)]
    assert max(errs) <= TOL, errs
    assert xs[-1].dtype == np.float32


@pytest.mark.parametrize("steps,options", [
    (20, {"final_sigmas_type": "sigma_min"}), (20, {"solver_type": "heun"}),
    (10, {"lower_order_final": False, "final_sigmas_type": "sigma_min"})])
def test_dpmpp_2m_options_match_diffusers(steps, options):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DPMSolverMultistepScheduler(**LINEAR, **options)
    ref.set_timesteps(steps)
    ref_xs, _ = run_diffusers(ref, x_T_for(1.0))
    xs, _ = run_ours("dpmpp_2m", x_T_for(1.0), Schedule.from_config(LINEAR), steps, **options)
    assert max(rel(a, b) for a, b in zip(xs, ref_xs)) <= TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_eta_and_clipped_output_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(**LINEAR, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    draws = np.random.default_rng(3).standard_normal((steps,) + SHAPE).astype(np.float32)
    ref_xs, _ = run_diffusers(ref, x_T_for(1.0), step_noise=lambda i: draws[i], eta=1.0,
                              use_clipped_model_output=True)
    xs, _ = run_ours("ddim", x_T_for(1.0), Schedule.from_config(LINEAR), steps,
                     noise=lambda i, shape: draws[i], eta=1.0, timestep_spacing=spacing,
                     use_clipped_model_output=True)
    assert max(rel(a, b) for a, b in zip(xs, ref_xs)) <= TOL


def eps_and_v(x, t):
    return np.concatenate([fake_eps(x, t), fake_v(x, t)], axis=1)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_learned_range_matches_diffusers(spacing, steps):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(**LINEAR, variance_type="learned_range", clip_sample=False,
                                  timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ref_xs, _ = run_diffusers(ref, x_T_for(1.0), model=eps_and_v,
                              generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    draws = {i: torch.randn(SHAPE, generator=gen).numpy()
             for i, t in enumerate(ref.timesteps) if t > 0}
    dict_model = lambda x, t: {"eps": fake_eps(x, t), "var": fake_v(x, t)}  # noqa: E731
    for model in (eps_and_v, dict_model):  # both output contracts
        xs, _ = run_ours("ddpm", x_T_for(1.0), Schedule.from_config(LINEAR), steps,
                         noise=lambda i, shape: draws[i], model=model, variance="learned_range",
                         clip_sample=False, timestep_spacing=spacing)
        assert max(rel(a, b) for a, b in zip(xs, ref_xs)) <= TOL


@pytest.mark.parametrize("steps", [100, 1000])
def test_ddpm_long_runs_match_diffusers_with_float64_schedule(steps):
    """Beyond 50 steps the gap to stock diffusers is its float32 alphas_cumprod (|1 - abar|
    loses digits near t = 0); with its schedule in float64 the gap is float32 round-off."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(**LINEAR)
    ref.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(2)
    draws = {i: torch.randn(SHAPE, generator=gen).numpy()
             for i, t in enumerate(ref.timesteps) if t > 0}
    ref_xs, _ = run_diffusers(ref, x_T_for(1.0), generator=torch.Generator().manual_seed(2))
    xs, _ = run_ours("ddpm", x_T_for(1.0), Schedule.from_config(LINEAR), steps,
                     noise=lambda i, shape: draws[i])
    assert max(rel(a, b) for a, b in zip(xs, ref_xs)) <= 1e-6


# --- DiT's learned-range DDPM, written out from Nichol & Dhariwal 2021 / DiT ----------------
def dit_space_timesteps(num_timesteps, count):
    """DiT/improved-diffusion respacing for one section: evenly strided, rounded."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 0
    cur, taken = 0.0, set()
    for _ in range(count):
        taken.add(round(cur))
        cur += stride
    return taken


def dit_p_sample_loop(model, x, betas, count, noises):
    """Respaced learned-range ancestral sampling, no clipping, as DiT's sample.py does."""
    use = dit_space_timesteps(len(betas), count)
    ac_full, last, new_betas, tmap = np.cumprod(1 - betas), 1.0, [], []
    for i, a in enumerate(ac_full):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
            tmap.append(i)
    b = np.array(new_betas)
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1 - ac_prev) / (1 - ac)
    post_log_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef_x0 = b * np.sqrt(ac_prev) / (1 - ac)
    coef_xt = (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac)
    xs = []
    for step, k in enumerate(range(len(b) - 1, -1, -1)):
        out = model(x, np.full(x.shape[0], float(tmap[k])))
        eps, v = out[:, :x.shape[1]], out[:, x.shape[1]:]
        x0 = np.sqrt(1 / ac[k]) * x - np.sqrt(1 / ac[k] - 1) * eps
        mean = coef_x0[k] * x0 + coef_xt[k] * x
        frac = (v + 1) / 2
        log_var = frac * np.log(b[k]) + (1 - frac) * post_log_clipped[k]
        x = mean + (k != 0) * np.exp(0.5 * log_var) * noises[step]
        xs.append(x)
    return xs


@pytest.mark.parametrize("steps", [10, 25, 50, 250])
def test_ddpm_learned_range_matches_dit_transcription(steps):
    assert dit_space_timesteps(1000, steps) == set(spaced_timesteps(1000, steps, "linspace"))
    noises = np.random.default_rng(4).standard_normal((steps,) + SHAPE)
    x_T = np.random.default_rng(5).standard_normal(SHAPE)  # float64 on both sides
    ref = dit_p_sample_loop(eps_and_v, x_T, np.linspace(1e-4, 0.02, 1000), steps, noises)
    xs, ts = run_ours("ddpm", x_T, Schedule.from_config(LINEAR), steps, model=eps_and_v,
                      noise=lambda i, shape: noises[i], variance="learned_range",
                      clip_sample=False, timestep_spacing="linspace")
    assert ts == sorted(map(float, dit_space_timesteps(1000, steps)), reverse=True)
    assert max(rel(a, b) for a, b in zip(xs, ref)) <= 1e-10


# --- Gaussian toy: x0 ~ N(M, S²) per element, so every model output is exact ------------
M, S = 0.3, 0.5


def gauss_eps(alpha, sigma, x):
    return sigma * (x - alpha * M) / (alpha**2 * S**2 + sigma**2)


def ode_exact(x, a_from, s_from, a_to, s_to):
    """The probability-flow ODE keeps (x - alpha·M)/sqrt(alpha²S² + sigma²) constant."""
    z = (x - a_from * M) / np.sqrt(a_from**2 * S**2 + s_from**2)
    return a_to * M + z * np.sqrt(a_to**2 * S**2 + s_to**2)


def vp_alpha_sigma(t):  # score-SDE VP with beta 0.1..20, written out again for the test
    log_a = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    return np.exp(log_a), np.sqrt(1 - np.exp(2 * log_a))


def dpm_solver_reference(x, grid, orders, model, alpha_sigma, lam, inv_lam):
    """DPM-Solver-1/2/3 (noise prediction, r1 = 1/3, r2 = 2/3) from Lu et al. 2022, Alg. 1-2."""
    xs = []
    for i, k in enumerate(orders):
        s, t = grid[i], grid[i + 1]
        h = lam(t) - lam(s)
        (a_s, _), (a_t, s_t) = alpha_sigma(s), alpha_sigma(t)
        e_s = model(x, s)
        x_t = a_t / a_s * x - s_t * np.expm1(h) * e_s
        if k == 2:
            s1 = inv_lam(lam(s) + 0.5 * h)
            a1, sg1 = alpha_sigma(s1)
            u = a1 / a_s * x - sg1 * np.expm1(0.5 * h) * e_s
            x_t = x_t - s_t / (2 * 0.5) * np.expm1(h) * (model(u, s1) - e_s)
        elif k == 3:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = inv_lam(lam(s) + r1 * h), inv_lam(lam(s) + r2 * h)
            (a1, sg1), (a2, sg2) = alpha_sigma(s1), alpha_sigma(s2)
            u1 = a1 / a_s * x - sg1 * np.expm1(r1 * h) * e_s
            d1 = model(u1, s1) - e_s
            u2 = (a2 / a_s * x - sg2 * np.expm1(r2 * h) * e_s
                  - sg2 * r2 / r1 * (np.expm1(r2 * h) / (r2 * h) - 1) * d1)
            d2 = model(u2, s2) - e_s
            x_t = x_t - s_t / r2 * (np.expm1(h) / h - 1) * d2
        x = x_t
        xs.append(x)
    return xs


@pytest.mark.parametrize("steps", [10, 21, 50])
def test_dpm_solver_fast_matches_reference_transcription(steps):
    """U-ViT pixel recipe: dpm_solver_pytorch.sample(steps, eps=1e-4, fast_version=True)."""
    sched = Schedule.from_config({"type": "vp_continuous"})
    lam = lambda t: np.log(vp_alpha_sigma(t)[0]) - np.log(vp_alpha_sigma(t)[1])  # noqa: E731
    inv_lam = lambda l: sched.inverse_lambda(l)  # noqa: E731  (checked against lam below)
    assert abs(lam(inv_lam(lam(0.37))) - lam(0.37)) < 1e-10
    k = steps // 3 + 1
    orders = [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + [steps % 3]
    grid = inv_lam(np.linspace(lam(1.0), lam(1e-4), k + 1))
    x_T = np.random.default_rng(6).standard_normal(SHAPE)
    ref = dpm_solver_reference(x_T, grid, orders, lambda x, t: fake_eps(x, 999 * t),
                               vp_alpha_sigma, lam, inv_lam)
    xs, ts = run_ours("dpm_solver", x_T, sched, steps)
    assert len(ts) == steps and ts[0] == pytest.approx(999.0)
    assert len(xs) == len(ref) and max(rel(a, b) for a, b in zip(xs, ref)) <= 1e-6


def gauss_denoiser(schedule):
    def denoise(x, t):
        tau = float(t[0])
        if schedule.kind == "vp_continuous":
            a, sg = vp_alpha_sigma(tau / 999)
        else:
            a, sg = schedule.alpha_sigma((tau + 1 - schedule.model_time_offset) / 1000)
        return gauss_eps(a, sg, x).astype(x.dtype)
    return denoise


@pytest.mark.parametrize("kind,options,tol", [
    ("vp_continuous", {}, 1e-2),                                    # U-ViT pixel (eval.py)
    ("vp_continuous", {"algorithm": "dpmsolver++"}, 2e-3),
    ("discrete", {}, 6e-2),                                         # U-ViT latent recipe
    ("discrete", {"method": "fast", "skip_type": "logSNR"}, 5e-3),
    ("discrete", {"method": "singlestep", "order": 2, "skip_type": "logSNR"}, 5e-2)])
def test_dpm_solver_converges_on_gaussian_data(kind, options, tol):
    sched = Schedule.from_config({"type": kind} if kind != "discrete" else
                                 {**LINEAR, "model_time_offset": 1})
    x_T = np.random.default_rng(7).standard_normal(SHAPE)
    errs = []
    for steps in (12, 24):
        out = sample("dpm_solver", gauss_denoiser(sched), x_T, sched, steps, **options)
        (a0, s0), (a1, s1) = sched.alpha_sigma(sched.t_min), sched.alpha_sigma(1.0)
        errs.append(rel(out, ode_exact(x_T, a1, s1, a0, s0)))
    assert errs[1] < errs[0] / 2.5 and errs[1] < tol, errs


def test_deterministic_samplers_converge_on_gaussian_data():
    sched = Schedule.from_config(LINEAR)
    x_T = np.random.default_rng(8).standard_normal(SHAPE)
    for name in ("ddim", "dpmpp_2m", "euler", "heun"):
        errs = []
        for steps in (10, 40):
            t0 = spaced_timesteps(1000, steps, "trailing")[0]
            scale = init_noise_sigma(name, sched, steps, timestep_spacing="trailing")
            a, sg = np.sqrt(sched.alphas_cumprod[t0]), np.sqrt(1 - sched.alphas_cumprod[t0])
            x = x_T * scale
            out = sample(name, gauss_denoiser(sched), x, sched, steps, clip_sample=False,
                         timestep_spacing="trailing") if name in ("ddim", "heun") else \
                sample(name, gauss_denoiser(sched), x, sched, steps, timestep_spacing="trailing")
            # euler/heun live in x/alpha space (VE): undo it for the exact answer
            start = x * a if name in ("euler", "heun") else x
            errs.append(rel(out, ode_exact(start, a, sg, 1.0, 0.0)))
        assert errs[1] < errs[0] / 2.5 and errs[1] < 0.1, (name, errs)


def ddm_denoiser(x, t):
    """x_t = (1 - t)·x0 + sqrt(t)·eps with c = -x0: exact posterior means for Gaussian x0."""
    t = float(t[0])
    var = (1 - t) ** 2 * S**2 + t
    x0 = M + (1 - t) * S**2 / var * (x - (1 - t) * M)
    eps = np.sqrt(t) / var * (x - (1 - t) * M)
    return {"c": (-x0).astype(x.dtype), "eps": eps.astype(x.dtype)}


@pytest.mark.parametrize("name,kind,steps,options", [
    ("ddpm", "discrete", 100, {"clip_sample": False}),
    ("ddpm", "discrete", 100, {"clip_sample": False, "variance": "fixed_large"}),
    ("ddim", "discrete", 100, {"clip_sample": False, "eta": 1.0}),
    ("euler_maruyama", "vp_continuous", 200, {}),
    ("ddm", "ddm_constant", 100, {"clip_sample": False})])
def test_stochastic_samplers_reach_the_data_distribution(name, kind, steps, options):
    sched = Schedule.from_config({**LINEAR} if kind == "discrete" else {"type": kind})
    model = ddm_denoiser if kind == "ddm_constant" else gauss_denoiser(sched)
    x_T = np.random.default_rng(10).standard_normal((4, 1, 64, 64)).astype(np.float32)
    out = sample(name, model, x_T, sched, steps, noise=np.random.default_rng(11), **options)
    assert out.dtype == np.float32
    assert abs(out.mean() - M) < 0.02 and abs(out.std() - S) < 0.04, (out.mean(), out.std())


# --- contract: noise, callback, dtype, registry --------------------------------------------
def test_noise_generator_and_callable_replay_identically():
    sched = Schedule.from_config(LINEAR)
    x_T = x_T_for(1.0)
    seen = {}

    def recording(i, shape):
        seen[i] = np.random.default_rng(100 + i).standard_normal(shape).astype(np.float32)
        return seen[i]

    state = np.random.get_state()
    a = sample("ddpm", fake_eps, x_T, sched, 20, noise=recording)
    b = sample("ddpm", fake_eps, x_T, sched, 20, noise=lambda i, shape: seen[i])
    c = sample("ddpm", fake_eps, x_T, sched, 20, noise=np.random.default_rng(0))
    d = sample("ddpm", fake_eps, x_T, sched, 20, noise=np.random.default_rng(0))
    assert sorted(seen) == list(range(19))  # t = 0 adds no noise
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)
    assert not np.array_equal(a, c)
    assert all(np.array_equal(u, v) for u, v in zip(state, np.random.get_state()))  # no globals
    with pytest.raises(ValueError, match="stochastic"):
        sample("ddpm", fake_eps, x_T, sched, 5)
    with pytest.raises(ValueError, match="shape"):
        sample("ddpm", fake_eps, x_T, sched, 5, noise=lambda i, shape: np.zeros(3))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_keeps_dtype_and_reports_progress(name):
    kind = SAMPLERS[name].schedules[0]
    sched = Schedule.from_config(LINEAR if kind == "discrete" else {"type": kind})
    model = (lambda x, t: (fake_eps(x, t), fake_eps(x, t))) if name == "ddm" else fake_eps
    infos = []
    for dtype in (np.float32, np.float64):
        x_T = x_T_for(init_noise_sigma(name, sched, 6)).astype(dtype)
        x_T_copy = x_T.copy()
        out = sample(name, model, x_T, sched, 6, noise=np.random.default_rng(0),
                     callback=infos.append)
        assert out.dtype == dtype and out.shape == SHAPE and np.isfinite(out).all()
        np.testing.assert_array_equal(x_T, x_T_copy)  # the caller's array is not touched
    total = infos[0]["total"]
    assert [info["i"] for info in infos[:total]] == list(range(total))
    assert {"i", "total", "t", "x", "denoised"} <= set(infos[0])


def test_schedule_config_defaults_reach_the_sampler():
    plain = Schedule.from_config(LINEAR)
    configured = Schedule.from_config({**LINEAR, "clip_sample": False,
                                       "timestep_spacing": "trailing"})
    x_T = 3 * x_T_for(1.0)
    a = sample("ddim", fake_eps, x_T, configured, 10)
    b = sample("ddim", fake_eps, x_T, plain, 10, clip_sample=False, timestep_spacing="trailing")
    c = sample("ddim", fake_eps, x_T, configured, 10, clip_sample=True)  # explicit wins
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_registry_errors_and_table():
    sched = Schedule.from_config(LINEAR)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("plms", fake_eps, x_T_for(1.0), sched, 10)
    with pytest.raises(ValueError, match="needs a"):
        sample("ddm", fake_eps, x_T_for(1.0), sched, 10)
    with pytest.raises(TypeError):
        sample("ddim", fake_eps, x_T_for(1.0), sched, 10, bogus=1)


def test_readme_sampler_table_is_the_records():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert sampler_table() in readme, "regenerate the README table with runtime.samplers.sampler_table()"
    assert all(f"`{name}`" in sampler_table() for name in SAMPLERS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5, 7])
def test_model_calls_is_what_the_sampler_does(name, steps):
    """The progress bar's total comes from the record: it must equal the real call count."""
    kind = SAMPLERS[name].schedules[0]
    sched = Schedule.from_config(LINEAR if kind == "discrete" else {"type": kind})
    calls = []

    def counting(x, t):
        calls.append(float(t[0]))
        return (fake_eps(x, t), fake_eps(x, t)) if name == "ddm" else fake_eps(x, t)

    sample(name, counting, x_T_for(1.0), sched, steps, noise=np.random.default_rng(0))
    assert len(calls) == model_calls(name, sched, steps)
