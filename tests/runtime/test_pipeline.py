"""The generation loop over a real exported bundle (ONNX Runtime on CPU)."""
import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.cli import cli
from edgediff.export.bundle import export_bundle
from edgediff.export.models import FAMILIES
from edgediff.runtime import read_bundle
from edgediff.runtime.backends import BackendError, load_backend
from edgediff.runtime.pipeline import GuidedDenoiser, generate, resolve_labels


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "ddpm"
    export_bundle("ddpm", FAMILIES["ddpm"].configs["tiny"], out, log=lambda m: None)
    return read_bundle(out)


@pytest.fixture(scope="module")
def backend(bundle):
    return load_backend(bundle, "ort")


def test_guidance_is_one_batched_call(bundle, backend, rng):
    calls = []

    class Counting:
        def infer(self, feed):
            calls.append(feed["x"].shape[0])
            return backend.infer(feed)

    x = rng.standard_normal((3, *bundle.manifest.sample_shape)).astype(np.float32)
    labels = np.array([1, 2, 3])
    guided = GuidedDenoiser(Counting(), bundle.manifest, labels, guidance=4.0)(x, 500.0)["eps"]
    assert calls == [6]
    t = np.full(3, 500, np.float32)
    cond = backend.infer({"x": x, "t": t, "y": labels})["eps"]
    uncond = backend.infer({"x": x, "t": t, "y": np.full(3, bundle.manifest.null_label)})["eps"]
    np.testing.assert_allclose(guided, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    plain = GuidedDenoiser(Counting(), bundle.manifest, labels, guidance=1.0)(x, 500.0)["eps"]
    assert calls[-1] == 3
    np.testing.assert_allclose(plain, cond, rtol=1e-6)


def test_same_seed_same_samples(bundle, backend):
    labels = resolve_labels(bundle.manifest, 5, None)
    a = generate(backend, bundle.manifest, 5, steps=4, batch=2, labels=labels, guidance=2.0, seed=7)
    b = generate(backend, bundle.manifest, 5, steps=4, batch=2, labels=labels, guidance=2.0, seed=7)
    c = generate(backend, bundle.manifest, 5, steps=4, batch=2, labels=labels, guidance=2.0, seed=8)
    assert a.samples.shape == (5, *bundle.manifest.sample_shape)
    assert np.array_equal(a.samples, b.samples) and not np.array_equal(a.samples, c.samples)
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_bad_feed_is_refused(backend):
    with pytest.raises(BackendError, match="must be a float32"):
        backend.infer({"x": np.zeros((1, 1, 8, 8)), "t": np.zeros(1, np.float32), "y": np.zeros(1, np.int64)})
    with pytest.raises(BackendError, match="missing"):
        backend.infer({"x": np.zeros((1, 1, 8, 8), np.float32)})


def test_cli_generate_writes_png_and_npz(bundle, tmp_path):
    res = CliRunner().invoke(cli, ["generate", str(bundle.path), "-n", "6", "--batch", "4", "--steps", "3",
                                   "--classes", "1,2", "--guidance", "2", "--out", str(tmp_path / "g.png"),
                                   "--npz", str(tmp_path / "s.npz")])
    assert res.exit_code == 0, res.output
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 2, 1, 2, 1, 2]
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 0


def test_cli_generate_bad_class(bundle, tmp_path):
    res = CliRunner().invoke(cli, ["generate", str(bundle.path), "--class", "99", "--out", str(tmp_path / "g.png")])
    assert res.exit_code != 0 and "out of range" in str(res.exception or res.output)
    assert not (tmp_path / "g.png").exists()


def test_cli_generate_first_draws_a_part_of_one_run(bundle, tmp_path):
    """--first k -n m gives samples k..k+m-1 of the seed's sequence, images and labels alike."""
    def run(name, *args):
        res = CliRunner().invoke(cli, ["generate", str(bundle.path), "--steps", "3", "--classes", "0,1,2",
                                       "--npz", str(tmp_path / name), *args])
        assert res.exit_code == 0, res.output
        return np.load(tmp_path / name)

    whole, part = run("a.npz", "-n", "7"), run("b.npz", "-n", "3", "--first", "4", "--batch", "2")
    np.testing.assert_array_equal(part["images"], whole["images"][4:])
    assert part["labels"].tolist() == whole["labels"][4:].tolist() == [1, 2, 0]


def test_a_gpu_provider_that_cannot_start_is_refused_not_silently_cpu(bundle, monkeypatch):
    """ONNX Runtime, asked for CUDA it cannot start, falls back to the CPU with a warning only
    (the real behaviour of this onnxruntime, made to list CUDA as available): refused."""
    import warnings

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BackendError, match="could not start CUDAExecutionProvider and would run on "
                                               "CPUExecutionProvider"):
            load_backend(bundle, "ort", device="cuda")
    from edgediff.runtime.backends.ort import check_providers

    check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider")   # in use: fine


def test_ort_tensorrt_provider_caches_engines_in_the_bundle_with_one_profile(bundle, tmp_path):
    """ORT's TensorRT provider gets its engine/timing caches under engines/ and an explicit
    batch profile when only the batch is dynamic (the option names of ORT's TensorRT EP)."""
    from edgediff.runtime.backends.ort import tensorrt_provider_options

    inputs = bundle.manifest.inputs
    opts = tensorrt_provider_options(tmp_path / "engines" / "ort-trt", inputs, 8)
    assert opts["trt_engine_cache_enable"] == opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "engines" / "ort-trt") and opts["trt_fp16_enable"] == "False"
    x = "x".join(str(d) for d in inputs["x"]["shape"][1:])
    assert f"x:1x{x}" in opts["trt_profile_min_shapes"] and f"x:8x{x}" in opts["trt_profile_max_shapes"]
    free = tensorrt_provider_options(tmp_path, {"cond": {"shape": ["batch", 3, "h", "w"]}}, 8)
    assert "trt_profile_min_shapes" not in free                  # other free dims: TensorRT's own profiles
