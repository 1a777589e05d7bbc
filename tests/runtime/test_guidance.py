"""Classifier guidance in the runtime against a plain NumPy restatement of guided-diffusion's
p_sample (condition_mean) and ddim_sample (condition_score) on a respaced grid, with a fake
model and a fake classifier gradient (guided_diffusion/gaussian_diffusion.py and respace.py at
commit 22e0df8, restated from their equations, not imported)."""
import numpy as np
import pytest

from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.guidance import ClassifierGuided, classifier_guidance, effective_options
from edgediff.runtime.samplers import sample
from edgediff.runtime.schedules import Schedule, spaced_timesteps

SCHED = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                              "beta_start": 0.0001, "beta_end": 0.02})
SHAPE = (3, 2, 4, 4)
LABELS = np.array([0, 3, 7])
SCALE = 2.5


def fake_model(x, t, learned=False):
    """eps (and DiT-style var in (-1, 1)) depending on x and the step."""
    t = np.asarray(t, np.float64)[:, None, None, None]
    eps = 0.8 * np.tanh(1.3 * x) + 0.05 * np.cos(t / 97.0)
    out = {"eps": eps.astype(np.float32)}
    if learned:
        out["var"] = np.tanh(0.5 * x + np.sin(t / 200.0)).astype(np.float32)
    return out


def fake_grad(x, t, y):
    """A gradient that depends on x, the (original) step and the label."""
    t = np.asarray(t, np.float64)[:, None, None, None]
    y = np.asarray(y, np.float64)[:, None, None, None]
    return (np.sin(x + 0.7 * y) * (1.0 + t / 1000.0)).astype(np.float32)


class FakeClassifier:
    def __init__(self):
        self.seen = []

    def infer(self, feed):
        assert feed["x"].dtype == np.float32 and feed["t"].dtype == np.float32 and feed["y"].dtype == np.int64
        self.seen.append(feed["t"].copy())
        return {"grad": fake_grad(feed["x"], feed["t"], feed["y"])}


def _noise(steps):
    z = np.random.default_rng(5).standard_normal((steps, *SHAPE))
    return lambda i, shape: z[i].astype(np.float32)


def _x_T():
    return np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32)


# --- guided-diffusion, restated -----------------------------------------------------------------

def _respaced(ts_ascending):
    """SpacedDiffusion's process on the retained steps (respace.py)."""
    ac = SCHED.alphas_cumprod[ts_ascending]
    prev = np.append(1.0, ac[:-1])
    betas = 1.0 - ac / prev
    post_var = betas * (1.0 - prev) / (1.0 - ac)
    return dict(ac=ac, prev=prev, betas=betas, post_var=post_var,
                post_log_clipped=np.log(np.append(post_var[1], post_var[1:])),
                coef1=betas * np.sqrt(prev) / (1.0 - ac), coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - ac))


def gd_p_sample_loop(steps, variance, clip):
    ts = np.sort(spaced_timesteps(1000, steps, "leading", 0))
    p = _respaced(ts)
    x, noise = _x_T().astype(np.float64), _noise(steps)
    for k, i in enumerate(range(steps - 1, -1, -1)):
        out = fake_model(x.astype(np.float32), np.full(3, ts[i], np.float32), variance == "learned_range")
        eps = out["eps"].astype(np.float64)
        if variance == "learned_range":
            frac = (out["var"].astype(np.float64) + 1) / 2
            log_var = frac * np.log(p["betas"][i]) + (1 - frac) * p["post_log_clipped"][i]
            var = np.exp(log_var)
        elif variance == "fixed_small":
            var, log_var = p["post_var"][i], p["post_log_clipped"][i]
        else:   # fixed_large
            table = np.append(p["post_var"][1], p["betas"][1:])
            var, log_var = table[i], np.log(table[i])
        x0 = np.sqrt(1 / p["ac"][i]) * x - np.sqrt(1 / p["ac"][i] - 1) * eps
        if clip:
            x0 = np.clip(x0, -1, 1)
        mean = p["coef1"][i] * x0 + p["coef2"][i] * x
        mean = mean + var * SCALE * fake_grad(x.astype(np.float32), np.full(3, ts[i]), LABELS)   # condition_mean
        x = mean + (i != 0) * np.exp(0.5 * log_var) * noise(k, SHAPE)
    return x


def gd_ddim_sample_loop(steps, eta, clip):
    ts = np.sort(spaced_timesteps(1000, steps, "leading", 0))
    p = _respaced(ts)
    x, noise = _x_T().astype(np.float64), _noise(steps)
    for k, i in enumerate(range(steps - 1, -1, -1)):
        ac, prev = p["ac"][i], p["prev"][i]
        eps = fake_model(x.astype(np.float32), np.full(3, ts[i], np.float32))["eps"].astype(np.float64)
        x0 = np.sqrt(1 / ac) * x - np.sqrt(1 / ac - 1) * eps
        if clip:
            x0 = np.clip(x0, -1, 1)
        eps = (np.sqrt(1 / ac) * x - x0) / np.sqrt(1 / ac - 1)                  # _predict_eps_from_xstart
        eps = eps - np.sqrt(1 - ac) * SCALE * fake_grad(x.astype(np.float32), np.full(3, ts[i]), LABELS)
        x0 = np.sqrt(1 / ac) * x - np.sqrt(1 / ac - 1) * eps                    # condition_score's pred_xstart
        eps = (np.sqrt(1 / ac) * x - x0) / np.sqrt(1 / ac - 1)
        sigma = eta * np.sqrt((1 - prev) / (1 - ac)) * np.sqrt(1 - ac / prev)
        x = x0 * np.sqrt(prev) + np.sqrt(1 - prev - sigma**2) * eps + (i != 0) * sigma * noise(k, SHAPE)
    return x


def run_runtime(sampler, steps, **options):
    learned = options.get("variance") == "learned_range"
    classifier = FakeClassifier()
    denoise = ClassifierGuided(lambda x, t: fake_model(x, t, learned), classifier, LABELS, SCALE, SCHED, sampler,
                               steps, effective_options(sampler, SCHED, options))
    x = sample(sampler, denoise, _x_T(), SCHED, steps, noise=_noise(steps), **denoise.sampler_options(options))
    return x.astype(np.float64), classifier


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_applies_condition_mean(variance, clip):
    got, classifier = run_runtime("ddpm", 10, variance=variance, clip_sample=clip, timestep_spacing="leading")
    want = gd_p_sample_loop(10, variance, clip)
    assert _rel(got, want) < 1e-5
    # the classifier saw the original training steps of the respaced grid, in sampling order
    assert [int(t[0]) for t in classifier.seen] == list(spaced_timesteps(1000, 10, "leading", 0))


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_applies_condition_score(eta, clip):
    got, _ = run_runtime("ddim", 8, eta=eta, clip_sample=clip, timestep_spacing="leading")
    assert _rel(got, gd_ddim_sample_loop(8, eta, clip)) < 1e-5


def test_guidance_changes_the_trajectory_in_the_gradient_direction():
    """Sanity of the sign: the restatement with scale 0 differs, and the guided run is the restatement."""
    got, _ = run_runtime("ddim", 8, clip_sample=False, timestep_spacing="leading")
    denoise = lambda x, t: fake_model(x, t)                                       # noqa: E731
    plain = sample("ddim", denoise, _x_T(), SCHED, 8, clip_sample=False, timestep_spacing="leading")
    assert _rel(got, plain) > 1e-2


def test_dpmpp_2m_uses_the_score_form():
    def corrected(x, t):
        a = SCHED.alphas_cumprod[t.astype(int)][:, None, None, None]
        return {"eps": (fake_model(x, t)["eps"] - np.sqrt(1 - a) * SCALE * fake_grad(x, t, LABELS)).astype(np.float32)}

    got, classifier = run_runtime("dpmpp_2m", 6)
    want = sample("dpmpp_2m", corrected, _x_T(), SCHED, 6)
    assert _rel(got, want) < 1e-5 and len(classifier.seen) == 6


def test_with_classifier_free_guidance_the_term_is_added_to_the_mixture():
    w = 3.0
    cond = lambda x, t: fake_model(x, t)["eps"]                                  # noqa: E731
    uncond = lambda x, t: 0.5 * fake_model(x, t)["eps"]                          # noqa: E731
    mixture = lambda x, t: {"eps": uncond(x, t) + w * (cond(x, t) - uncond(x, t))}   # noqa: E731
    opts = effective_options("ddim", SCHED, {"clip_sample": False})
    guided = ClassifierGuided(mixture, FakeClassifier(), LABELS, SCALE, SCHED, "ddim", 10, opts)
    x, t = _x_T(), np.full(3, 500.0, np.float32)
    a = SCHED.alphas_cumprod[500]
    want = mixture(x, t)["eps"] - np.sqrt(1 - a) * SCALE * fake_grad(x, t, LABELS)
    np.testing.assert_allclose(guided(x, t)["eps"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale, words", [(float("nan"), "finite"), (float("inf"), "finite"),
                                          ("2", "must be a number"), (True, "must be a number")])
def test_bad_scale_is_one_line(scale, words):
    with pytest.raises(InvalidInput, match=words):
        classifier_guidance(FakeClassifier(), scale, LABELS, "ddim")


def test_refusals():
    assert classifier_guidance(None, 0.0) is False                               # off: nothing needed
    with pytest.raises(InvalidInput, match="needs a classifier in the bundle: add one with `edgediff add-classifier"):
        classifier_guidance(None, 1.0, LABELS, "ddim")
    with pytest.raises(InvalidInput, match="works with the ddpm, ddim, dpmpp_2m samplers.*not 'euler'"):
        classifier_guidance(FakeClassifier(), 1.0, LABELS, "euler")
    with pytest.raises(InvalidInput, match="needs class labels"):
        classifier_guidance(FakeClassifier(), 1.0, None, "ddim")
    opts = effective_options("ddim", SCHED, {})
    x0_model = ClassifierGuided(lambda x, t: {"x0": x}, FakeClassifier(), LABELS, 1.0, SCHED, "ddim", 4, opts)
    with pytest.raises(InvalidInput, match="predicts eps"):
        x0_model(_x_T(), np.full(3, 500.0, np.float32))
    vp = Schedule.from_config({"type": "vp_continuous"})
    with pytest.raises(InvalidInput):
        ClassifierGuided(fake_model, FakeClassifier(), LABELS, 1.0, vp, "ddim", 10, {})


# --- the pipeline and the CLI, over stand-in backends (no export needed) --------------------------

def _manifest(conditional=True, classifier=True):
    from edgediff.runtime.manifest import Component, Manifest

    x = {"dtype": "float32", "shape": ["batch", 2, 4, 4]}
    t = {"dtype": "float32", "shape": ["batch"]}
    y = {"dtype": "int64", "shape": ["batch"]}
    comps = {"classifier": Component(inputs={"x": x, "t": t, "y": y}, outputs={"grad": x},
                                     models={"fp32": "classifier_grad.onnx"}, extra={"num_classes": 10})}
    return Manifest(family="adm", config={}, prediction="epsilon", time={}, sample_shape=(2, 4, 4),
                    schedule={"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                              "beta_end": 0.02},
                    models={"fp32": "model.onnx"}, inputs={"x": x, "t": t, **({"y": y} if conditional else {})},
                    outputs={"eps": x}, num_classes=10 if conditional else None,
                    null_label=10 if conditional else None, components=comps if classifier else {})


class _Bundle:
    def __init__(self, manifest):
        self.manifest = manifest


class _Model:
    def __init__(self, manifest):
        self.conditional = manifest.conditional
        self.labels = []

    def infer(self, feed):
        if self.conditional:
            self.labels.append(feed["y"].copy())
        return fake_model(feed["x"], feed["t"])

    def close(self):
        pass


class _Classifier(FakeClassifier):
    def __init__(self):
        super().__init__()
        self.labels = []

    def infer(self, feed):
        self.labels.append(feed["y"].copy())
        return super().infer(feed)

    def close(self):
        pass


def test_pipeline_guides_with_the_bundle_classifier():
    from edgediff.runtime.pipeline import Pipeline

    m = _manifest()
    model, classifier = _Model(m), _Classifier()
    pipe = Pipeline(_Bundle(m), model, classifier=classifier)
    base = pipe(n=3, classes=[2, 5], steps=4, sampler="ddim", seed=0)
    assert classifier.seen == []
    guided = pipe(n=3, classes=[2, 5], steps=4, sampler="ddim", seed=0, classifier_scale=3.0)
    assert len(classifier.seen) == 4 and not np.allclose(base.samples, guided.samples)
    assert classifier.labels[0].tolist() == [2, 5, 2] == guided.labels.tolist()
    # with classifier-free guidance too: the model gets both halves, the classifier the labels
    pipe(n=3, classes=[2, 5], steps=2, sampler="ddim", guidance=2.0, classifier_scale=3.0)
    assert model.labels[-1].tolist() == [2, 5, 2, 10, 10, 10] and classifier.labels[-1].tolist() == [2, 5, 2]


def test_unconditional_model_takes_the_classifier_labels():
    from edgediff.runtime.pipeline import Pipeline

    m = _manifest(conditional=False)
    classifier = _Classifier()
    pipe = Pipeline(_Bundle(m), _Model(m), classifier=classifier)
    out = pipe(n=2, classes=[7], steps=3, sampler="ddpm", classifier_scale=1.0)
    assert out.labels.tolist() == [7, 7] and classifier.labels[0].tolist() == [7, 7]
    with pytest.raises(InvalidInput, match="unconditional"):
        pipe(n=2, classes=[7], steps=3)                    # without guidance labels mean nothing


def _cli(monkeypatch, tmp_path, capsys, manifest, classifier, *args):
    from edgediff.cli import main
    from edgediff.runtime.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "from_bundle", classmethod(
        lambda cls, *a, **k: cls(_Bundle(manifest), _Model(manifest), classifier=classifier)))
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tmp_path / "b"), "-n", "2", "--steps", "2", "--npz", str(tmp_path / "s.npz"), *args])
    return exc.value.code, capsys.readouterr()


@pytest.mark.parametrize("args, has_classifier, words", [
    (["--classifier-scale", "2"], False, "error: classifier guidance needs a classifier in the bundle"),
    (["--classifier-scale", "nan"], True, "error: the classifier scale must be a finite number"),
    (["--classifier-scale", "inf"], True, "error: the classifier scale must be a finite number"),
    (["--classifier-scale", "2", "--sampler", "heun"], True, "error: classifier guidance works with the ddpm"),
])
def test_cli_errors_are_one_line(monkeypatch, tmp_path, capsys, args, has_classifier, words):
    m = _manifest(classifier=has_classifier)
    code, out = _cli(monkeypatch, tmp_path, capsys, m, _Classifier() if has_classifier else None, *args)
    lines = out.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(words), out.err
    assert not (tmp_path / "s.npz").exists()


def test_cli_generates_with_classifier_guidance(monkeypatch, tmp_path, capsys):
    classifier = _Classifier()
    code, out = _cli(monkeypatch, tmp_path, capsys, _manifest(), classifier, "--classifier-scale", "2",
                     "--sampler", "ddim", "--class", "4")
    assert code in (0, None) and (tmp_path / "s.npz").exists(), out.err
    assert len(classifier.seen) == 2 and classifier.labels[0].tolist() == [4, 4]
