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
