"""runtime.sampler_ddm against a plain torch transcription of the official DDM sampling loops.

Reference: GuHuangAI/DDM-Public, commit 8bf8ee23e449dc899ec974d82a251cd7b6846c94,
ddm/ddm_const.py: ``DDPM.sample_fn`` (sample_type euler, the default), ``DDPM.sample_fn_2order``
and ``LatentDiffusion.sample_fn``, with ``pred_x0_from_xt`` / ``pred_xtms_from_xt`` inlined.
The transcriptions below are written out anew (not copied), keeping the official arithmetic,
its float32/float64 tensors and the order of its random draws: ``torch.randn`` /
``randn_like`` are replaced by ``randn(shape)``, which pops the next array of a recorded
list, and our sampler is fed the same list through ``noise(i, shape)``. Both sides call the
same fake (c, eps) model, a fixed random linear function of x and t, with float32 t (what an
exported model receives).
"""

import numpy as np
import pytest

from edgediff.runtime.sampler_ddm import SOFTSIGN_LIMIT, ddm_model_calls, ddm_plan, sample_ddm
from edgediff.runtime.schedules import Schedule

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPE = (2, 3, 4, 4)
EPS = 1e-4
SCHED = Schedule.from_config({"type": "ddm_constant"})


# --- the fake model ----------------------------------------------------------------------
_P = np.random.default_rng(11).standard_normal((6,) + SHAPE[1:])


def model_np(x, t):
    """(c, eps) at (x, t): linear in x (with a pixel shift mixing neighbours) and in t."""
    t = np.asarray(t, np.float32).astype(np.float64).reshape(-1, 1, 1, 1)
    xd = x.astype(np.float64)
    c = -0.6 * xd + 0.3 * _P[0] * xd + 0.2 * np.roll(xd, 1, axis=-1) + 0.4 * _P[1] * t + 0.3 * _P[2]
    e = 0.7 * xd + 0.2 * _P[3] * xd + 0.3 * _P[4] * t + 0.2 * _P[5]
    return c.astype(x.dtype), e.astype(x.dtype)


class TorchModel:
    """The official ``self.model(img, cur_time)``: records t, returns (C, noise)."""

    def __init__(self):
        self.times = []

    def __call__(self, img, t):
        assert t.shape == (img.shape[0],) and bool((t == t[0]).all())
        self.times.append(float(np.float32(t[0].item())))
        c, e = model_np(img.numpy(), t.numpy().astype(np.float32))
        return torch.from_numpy(c), torch.from_numpy(e)


class Recorded:
    """torch.randn / randn_like replaced by the next array of a recorded list."""

    def __init__(self, arrays):
        self.arrays, self.shapes = list(arrays), []

    def __call__(self, shape):
        z = self.arrays[len(self.shapes)]
        assert z.shape == tuple(shape)
        self.shapes.append(tuple(shape))
        return torch.from_numpy(z.copy())


# --- transcriptions of the official loops (batch, device and cond plumbing dropped) --------
def _col(v):  # a [B] time vector as a [B, 1, 1, 1] column
    return v.reshape(-1, 1, 1, 1)


def official_sample_fn(model, randn, shape, n, eps, denoise, dtype, latent=False,
                       softsign=False):
    """DDPM.sample_fn (latent=False) / LatentDiffusion.sample_fn (latent=True), with
    up_scale=1, unnormalize=False, scale_input=1, sigma_max=1."""
    b = shape[0]
    sizes = torch.tensor([1.0 / n], dtype=dtype).repeat(n)
    if denoise:
        e = torch.tensor(eps, dtype=dtype)
        sizes = torch.cat((sizes[:-1], torch.tensor([sizes[-1] - e], dtype=dtype),
                           torch.tensor([e], dtype=dtype)))
    img = randn(shape)
    img = F.interpolate(img, scale_factor=1, mode="bilinear", align_corners=True)
    if not latent:
        img = img * 1.0  # sigma_max
    now = torch.ones((b,), dtype=dtype)
    for i, size in enumerate(sizes):
        s = torch.full((b,), size.item(), dtype=dtype)
        if i == len(sizes) - 1:
            s = now
        c, noise = model(img, now)
        t, sc = _col(now), _col(s)
        if latent and softsign:
            x0 = (img - c * t - torch.sqrt(t) * noise).clamp(-SOFTSIGN_LIMIT, SOFTSIGN_LIMIT)
            c = -x0
        x0 = img - c * t - torch.sqrt(t) * noise
        if not latent:  # clip_x_start
            x0 = x0.clamp(-1.0, 1.0)
        c = -1 * x0
        mean = img + c * (t - sc) - c * t - sc / torch.sqrt(t) * noise
        z = randn(mean.shape)
        img = mean + torch.sqrt(sc * (t - sc) / t) * z
        now = now - s
    if not latent:
        img = img.clamp(-1.0, 1.0)
    elif softsign:
        img = img.clamp(-SOFTSIGN_LIMIT, SOFTSIGN_LIMIT)
    return img


def official_sample_fn_2order(model, randn, shape, n, eps, denoise, dtype):
    """DDPM.sample_fn_2order, up_scale=1, unnormalize=False, clip_x_start=True. The official
    ``if s >= step`` on a [B] tensor needs B == 1; all entries are equal, so ``.all()``."""
    b = shape[0]
    full = 1.0 / n * 2
    sizes = torch.tensor([full], dtype=dtype).repeat(n // 2)
    if n % 2 != 0:
        sizes = torch.cat((sizes, torch.tensor([1.0 - n // 2 * full], dtype=dtype)))
    if denoise:
        e = torch.tensor(eps, dtype=dtype)
        sizes = torch.cat((sizes[:-1], torch.tensor([sizes[-1] - e], dtype=dtype),
                           torch.tensor([e], dtype=dtype)))
    img = randn(shape)
    img = F.interpolate(img, scale_factor=1, mode="bilinear", align_corners=True) * 1.0
    now = torch.ones((b,), dtype=dtype)
    for i, size in enumerate(sizes):
        s = torch.full((b,), size.item(), dtype=dtype)
        h = s * 1  # alpha = 1
        if i == len(sizes) - 1:
            s = now
        sigma = torch.sqrt(s * (now - s) / now)
        c, noise = model(img, now)
        x0 = (img - c * _col(now) - torch.sqrt(_col(now)) * noise).clamp(-1.0, 1.0)
        c = -1 * x0
        d = -c - 1 / torch.sqrt(_col(now)) * noise
        img_h = img + _col(h) * d
        now_h = now - h
        if bool((s >= full).all()):
            c, noise = model(img_h, now_h)
            x0 = (img_h - c * _col(now_h) - torch.sqrt(_col(now_h)) * noise).clamp(-1.0, 1.0)
            c = -1 * x0
            d2 = -c - 1 / torch.sqrt(_col(now_h)) * noise
            img_h = img + _col(h) * ((1 - 1 / 2) * d + 1 / 2 * d2)
        z = randn(img.shape)
        img = img_h + _col(sigma) * z
        now = now_h
    return img.clamp(-1.0, 1.0)


# --- running both sides ----------------------------------------------------------------------
def recorded_noise(n_arrays, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(dtype) for _ in range(n_arrays)]


def run_both(n, order, denoise, dtype, latent=False, softsign=False, seed=0):
    k = len(ddm_plan(n, order, denoise, EPS)[0])
    zs = recorded_noise(k + 1, dtype, seed)  # x_T, then one randn_like per official step

    tmodel, randn = TorchModel(), Recorded(zs)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    if order == 1:
        ref = official_sample_fn(tmodel, randn, SHAPE, n, EPS, denoise, tdtype, latent, softsign)
    else:
        ref = official_sample_fn_2order(tmodel, randn, SHAPE, n, EPS, denoise, tdtype)
    assert randn.shapes == [SHAPE] * (k + 1)

    times, draws = [], []

    def denoise_fn(x, t):
        assert t.dtype == np.float32 and t.shape == (x.shape[0],)
        times.append(float(t[0]))
        return model_np(x, t)

    def noise(i, shape):
        draws.append((i, tuple(shape)))
        return zs[i + 1]

    out = sample_ddm(denoise_fn, zs[0].copy(), SCHED, n, noise, order=order,
                     clip_sample=not latent, denoise_last=denoise, softsign=softsign)
    assert out.dtype == dtype
    # step i draws the official i-th randn_like; the last one (factor 0) is not drawn
    assert draws == [(i, SHAPE) for i in range(k - 1)]
    return out, ref.numpy(), times, tmodel.times


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


CASES = ([(1, n, d, False) for n in (1, 2, 5, 10) for d in (True, False)]
         + [(2, n, True, False) for n in (1, 2, 3, 5, 10)]
         + [(2, n, False, False) for n in (1, 3, 5)]  # even N without denoise: see below
         + [(1, n, d, True) for n in (1, 2, 5, 10) for d in (True, False)])


@pytest.mark.parametrize("order,n,denoise,latent", CASES)
def test_matches_official_float64(order, n, denoise, latent):
    """Float64 on both sides: the same model-call times bit for bit, x to rounding."""
    out, ref, times, ref_times = run_both(n, order, denoise, np.float64, latent)
    assert times == ref_times
    assert len(times) == ddm_model_calls(n, order, denoise)
    assert rel(out, ref) < 1e-12


@pytest.mark.parametrize("order,n,denoise,latent", CASES)
def test_matches_official_float32(order, n, denoise, latent):
    """The official float32 tensors against our float32 run (float64 schedule maths)."""
    out, ref, times, ref_times = run_both(n, order, denoise, np.float32, latent)
    assert len(times) == len(ref_times) == ddm_model_calls(n, order, denoise)
    np.testing.assert_allclose(times, ref_times, rtol=0, atol=1e-6)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("n,denoise", [(2, True), (10, True), (5, False)])
def test_softsign_matches_official(n, denoise):
    for dtype in (np.float64, np.float32):
        out, ref, times, ref_times = run_both(n, 1, denoise, dtype, latent=True, softsign=True)
        np.testing.assert_allclose(times, ref_times, rtol=0, atol=1e-6)
        assert rel(out, ref) < (1e-12 if dtype == np.float64 else 1e-5)
        assert np.abs(out).max() <= SOFTSIGN_LIMIT


def test_clamping_is_exercised():
    """The fake model drives x0 past ±1: the pixel and latent loops really differ."""
    pixel, _, _, _ = run_both(10, 1, True, np.float64)
    latent, _, _, _ = run_both(10, 1, True, np.float64, latent=True)
    assert np.abs(pixel).max() <= 1.0 < np.abs(latent).max()


def test_official_times():
    """The grids read off the official code: N steps of 1/N from 1, the last split."""
    h, t, s, sigma, correct = ddm_plan(5, 1, True, EPS)
    np.testing.assert_allclose(h, [0.2, 0.2, 0.2, 0.2, 0.2 - EPS, EPS], rtol=0, atol=1e-15)
    np.testing.assert_allclose(t, [1.0, 0.8, 0.6, 0.4, 0.2, EPS], rtol=0, atol=1e-15)
    assert s[-1] == t[-1] and sigma[-1] == 0 and not correct.any()
    np.testing.assert_allclose(sigma[:-1], np.sqrt(h[:-1] * (t[:-1] - h[:-1]) / t[:-1]))
    h, t, s, sigma, correct = ddm_plan(5, 2, True, EPS)  # 2/5, 2/5, 1/5 - eps, eps
    np.testing.assert_allclose(h, [0.4, 0.4, 0.2 - EPS, EPS], rtol=0, atol=1e-15)
    assert correct.tolist() == [True, True, False, False]


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 20, 50])
def test_model_calls(order, denoise, n):
    calls = []
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    sample_ddm(lambda x, t: calls.append(t) or model_np(x, t), x, SCHED, n,
               np.random.default_rng(2), order=order, denoise_last=denoise)
    assert len(calls) == ddm_model_calls(n, order, denoise)
    expected = n + denoise - (order == 2 and n % 2 == 0)
    assert ddm_model_calls(n, order, denoise) == expected


def test_order2_even_without_denoise_skips_the_official_t0_corrector():
    """Official sample_fn_2order with even N and denoise=False corrects the last step too,
    calling the model at t = 0 and dividing by sqrt(0); ours ends with an Euler step."""
    zs = recorded_noise(3, np.float64)
    tmodel = TorchModel()
    with np.errstate(all="ignore"):
        official_sample_fn_2order(tmodel, Recorded(zs), SHAPE, 2, EPS, False, torch.float64)
    assert tmodel.times == [1.0, 0.0]
    times = []
    out = sample_ddm(lambda x, t: times.append(float(t[0])) or model_np(x, t), zs[0], SCHED, 2,
                     lambda i, shape: zs[i + 1], order=2, denoise_last=False)
    assert times == [1.0] and np.isfinite(out).all()


def test_callback_and_options():
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    infos = []
    out = sample_ddm(model_np, x, SCHED, 4, np.random.default_rng(0), callback=infos.append)
    assert [i["i"] for i in infos] == list(range(5)) and infos[0]["total"] == 5
    assert [i["t"] for i in infos] == pytest.approx([1.0, 0.75, 0.5, 0.25, EPS])
    np.testing.assert_array_equal(out, infos[-1]["x"])
    with pytest.raises(ValueError, match="stochastic"):
        sample_ddm(model_np, x, SCHED, 4)
    with pytest.raises(ValueError, match="softsign"):
        sample_ddm(model_np, x, SCHED, 4, np.random.default_rng(0), softsign=True)
    with pytest.raises(ValueError, match="order"):
        ddm_model_calls(4, order=3)
    with pytest.raises(ValueError, match="ddm_constant"):
        sample_ddm(model_np, x, Schedule.from_config({}), 4, np.random.default_rng(0))
    # eps: explicit, else the schedule's t_min (sigma_min²)
    t_last = []
    sample_ddm(lambda x, t: t_last.append(float(t[0])) or model_np(x, t), x, SCHED, 4,
               np.random.default_rng(0), eps=1e-3)
    assert t_last[-1] == pytest.approx(1e-3)
    sched = Schedule.from_config({"type": "ddm_constant", "sigma_min": 0.02})
    t_last = []
    sample_ddm(lambda x, t: t_last.append(float(t[0])) or model_np(x, t), x, sched, 4,
               np.random.default_rng(0))
    assert t_last[-1] == pytest.approx(4e-4)


def test_torch_free():
    import subprocess
    import sys
    code = ("import sys; import edgediff.runtime.sampler_ddm; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
