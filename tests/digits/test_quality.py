"""The quality table's pieces: the outside (scikit-learn) classifier and the PyTorch-driven
judge of a training directory."""
import numpy as np
import pytest

pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")

from edgediff.digits import data as digits, quality  # noqa: E402
from edgediff.digits.demo import shipped  # noqa: E402
from edgediff.digits import judge as rt_judge  # noqa: E402


@pytest.fixture(scope="module")
def outside():
    return quality.OutsideClassifier()


def test_outside_classifier_reads_held_out_digits(outside):
    data = digits.load()
    assert outside.accuracy(data.held_x, data.held_y) >= 0.95
    assert outside.accuracy(data.held_x, (data.held_y + 1) % 10) <= 0.05


def test_outside_classifier_rejects_noise(outside):
    noise = np.random.default_rng(0).uniform(-1, 1, (200, 1, 16, 16)).astype(np.float32)
    labels = np.repeat(np.arange(10), 20)
    assert outside.accuracy(noise, labels) <= 0.3


@pytest.mark.parametrize("family", ["ddpm", "uvit", "dit", "ddm"])
def test_shipped_weights_through_torch_draw_the_requested_digits(family, outside, one_thread):
    """The loop that runs bundles, driven by the PyTorch module: 5 per class, 10 steps."""
    name, config, module, spec = quality.load_trained(shipped(family))
    manifest = quality.trained_manifest(name, config, spec)
    backend = quality.TorchBackend.from_spec(module, spec)
    result, samples = rt_judge.judge_backend(backend, manifest, per_class=5, steps=10, batch=50)
    labels = rt_judge.class_order_labels(5)
    assert result.n == 50 and result.accuracy >= 0.9
    assert outside.accuracy(samples, labels) >= 0.9


def test_shipped_unconditional_v_model_draws_recognisable_varied_digits(outside, one_thread):
    """lucid: unconditional, v-prediction on the sigmoid schedule; 50 samples, 10 steps: the
    judge recognises most, the SVM agrees with its class, and the classes vary."""
    name, config, module, spec = quality.load_trained(shipped("lucid"))
    manifest = quality.trained_manifest(name, config, spec)
    assert (manifest.prediction, manifest.conditional) == ("v_prediction", False)
    backend = quality.TorchBackend.from_spec(module, spec)
    result, samples = rt_judge.judge_backend(backend, manifest, per_class=5, steps=10, batch=50)
    assert result.n == 50 and not result.conditional and result.accuracy >= 0.7
    assert sum(share > 0 for share in result.per_class) >= 7 and sum(result.per_class) == pytest.approx(1.0)
    assert outside.accuracy(samples, None) >= 0.7


def test_judge_of_unlabelled_real_digits_is_its_baseline():
    held = rt_judge.load_judge()
    result = rt_judge.judge(held["held_images"], None)
    assert result.accuracy == result.baseline_accuracy >= 0.9 and "recognised" in result.summary()
    assert sum(result.per_class) == pytest.approx(1.0) and min(result.per_class) > 0.05
