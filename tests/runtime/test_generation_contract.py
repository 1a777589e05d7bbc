"""The generation contract: per-sample noise (batch-size independence), recommended sampling,
the Pipeline API and the typed manifest."""
import json
import shutil

import numpy as np
import pytest

from edgediff.export.bundle import export_bundle
from edgediff.export.models import FAMILIES
from edgediff.runtime import Pipeline, read_bundle
from edgediff.runtime.backends import Backend
from edgediff.runtime.bundle import BundleError, write_manifest
from edgediff.runtime.manifest import Manifest
from edgediff.runtime.pipeline import generate, resolve_labels
from edgediff.runtime.samplers import SAMPLERS


@pytest.fixture(scope="module")
def ddpm_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "ddpm"
    export_bundle("ddpm", FAMILIES["ddpm"].configs["tiny"], out, log=lambda m: None)
    return read_bundle(out)


class RowwiseBackend(Backend):
    """A NumPy model whose row i depends only on row i of the feed (like a real network)."""

    def infer_impl(self, feed):
        x, t = feed["x"], feed["t"].reshape(-1, 1, 1, 1)
        eps = np.tanh(0.5 * x + 0.001 * t).astype(np.float32)
        return [(-0.5 * x).astype(np.float32), eps] if len(self.outputs) == 2 else [eps]


def fake_manifest(schedule: dict, outputs=("eps",)) -> Manifest:
    decl = {"dtype": "float32", "shape": ["batch", 1, 4, 4]}
    return Manifest(family="test", config={}, prediction="epsilon", time={}, schedule=schedule,
                    sample_shape=(1, 4, 4), models={"fp32": "model.onnx"},
                    inputs={"x": decl, "t": {"dtype": "float32", "shape": ["batch"]}},
                    outputs={n: decl for n in outputs})


def _all_cases(ddpm_bundle):
    from edgediff.runtime.backends import load_backend

    real = (load_backend(ddpm_bundle, "ort"), ddpm_bundle.manifest)
    vp = fake_manifest({"type": "vp_continuous"})
    ddm = fake_manifest({"type": "ddm_constant"}, ("c", "eps"))
    for name, record in SAMPLERS.items():
        if "discrete" in record.schedules:
            yield name, real
        elif "vp_continuous" in record.schedules:
            yield name, (RowwiseBackend(vp.inputs, vp.output_names), vp)
        else:
            yield name, (RowwiseBackend(ddm.inputs, ddm.output_names), ddm)


def test_samples_do_not_depend_on_batch_size_or_n(ddpm_bundle):
    """Sample i depends on (seed, i, options) only: --batch 4 vs 16, -n 16 vs first 16 of -n 32,
    for every sampler, stochastic ones included."""
    for name, (backend, manifest) in _all_cases(ddpm_bundle):
        guidance = 2.0 if manifest.null_label is not None else 1.0
        kw = dict(sampler=name, steps=4, guidance=guidance, seed=5)
        run = lambda n, batch: generate(backend, manifest, n, batch=batch,  # noqa: E731
                                        labels=resolve_labels(manifest, n, None), **kw).samples
        a, b, c = run(16, 4), run(16, 16), run(32, 7)
        assert np.array_equal(a, b), name
        assert np.array_equal(a, c[:16]), name
        assert not np.array_equal(a[0], a[1]), name


def test_shards_reproduce_the_whole_run(ddpm_bundle):
    with Pipeline.from_bundle(ddpm_bundle.path) as pipe:
        whole = pipe(10, sampler="ddpm", steps=3, seed=2, classes=[4]).samples
        tail = pipe(4, sampler="ddpm", steps=3, seed=2, classes=[4], first=6).samples
    assert np.array_equal(whole[6:], tail)


def test_recommended_sampling_is_recorded_and_used(ddpm_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(ddpm_bundle.path, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    assert raw["sampling"] == {"sampler": None, "steps": 20, "guidance": 1.0}
    raw["sampling"] = {"sampler": "ddim", "steps": 3, "guidance": 3.0}
    write_manifest(copy, Manifest.from_dict(raw))       # as a legitimate writer would (integrity record)
    calls = []
    with Pipeline.from_bundle(copy) as pipe:
        real = pipe.backend.infer
        pipe.backend.infer = lambda feed: calls.append(len(feed["x"])) or real(feed)
        default = pipe(2, classes=[1], seed=0).samples
        explicit = pipe(2, classes=[1], seed=0, sampler="ddim", steps=3, guidance=3.0).samples
    assert calls == [4, 4, 4, 4, 4, 4]          # 3 steps, guided (2 samples doubled), twice
    assert np.array_equal(default, explicit)


def test_pipeline_output_and_lifecycle(ddpm_bundle):
    pipe = Pipeline.from_bundle(ddpm_bundle.path)
    with pipe:
        out = pipe(n=3, classes=[3], steps=2, seed=0)
    assert out.images.shape == (3, 8, 8, 1) and out.images.dtype == np.uint8
    assert out.labels.tolist() == [3, 3, 3]
    assert pipe.backend.session is None          # closed by the context manager
    for bad in (dict(n=0), dict(batch=0), dict(first=-1), dict(steps=0), dict(guidance="3"), dict(classes=[True])):
        with pytest.raises(ValueError, match="must be|out of range"):
            Pipeline(ddpm_bundle, None)(**{"n": 1, **bad})


@pytest.mark.parametrize("change,match", [
    ({"sample_shape": [1, 100000, 100000]}, "sample_shape entries"),
    ({"sample_shape": [64, 4096, 4096]}, "implausibly large"),
    ({"sample_shape": "8x8"}, "sample_shape"),
    ({"inputs": ["x", "t"]}, "inputs must be a JSON object"),
    ({"num_classes": "ten"}, "num_classes"),
    ({"models": {"fp32": "../../etc/passwd"}}, "inside the bundle"),
    ({"models": {"fp32": "/abs/model.onnx"}}, "inside the bundle"),
    ({"sampling": {"guidance": "nan"}}, "sampling.guidance"),
    ({"sampling": {"steps": 0}}, "sampling.steps"),
    ({"schema_version": 99}, "schema version 99"),
    ({"schema_version": True}, "schema version True"),
    ({"prediction": "velocity"}, "prediction must be one of"),
    ({"prediction": "v_prediction"}, "a v_prediction model needs output"),      # its output is v
    ({"prediction": "v_prediction", "schema_version": 1}, "prediction must be one of"),
    ({"prediction": "ddm_c_eps"}, "needs output"),
    ({"schedule": {"type": "ddm_constant"}}, "cannot use a ddm_constant schedule"),
    ({"schedule": {"num_train_timesteps": 10**9}}, "num_train_timesteps"),
    ({"schedule": {"beta_start": "x"}}, "schedule: could not convert"),
    ({"schedule": {"beta_end": float("nan")}}, "finite"),
    ({"sample_shape": [1, 4, 4]}, "inputs.x must have shape"),
])
def test_malformed_manifests_are_one_line_errors(ddpm_bundle, tmp_path, change, match):
    copy = tmp_path / "b"
    shutil.copytree(ddpm_bundle.path, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    raw.update(change)
    (copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=match) as err:
        read_bundle(copy)
    assert "\n" not in str(err.value)


def test_unlisted_model_file_is_refused(ddpm_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(ddpm_bundle.path, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    del raw["files"]["model.onnx"]
    (copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="not covered"):
        read_bundle(copy)


def test_schema_1_bundles_read_dit_v_as_var():
    raw = fake_manifest({}, ("eps", "v")).to_dict()
    raw["schema_version"] = 1
    m = Manifest.from_dict(raw)
    assert m.output_names == ["eps", "var"] and m.graph_outputs == {"var": "v"}
    raw["schema_version"] = 2
    assert Manifest.from_dict(raw).output_names == ["eps", "v"]


def test_non_finite_model_output_is_an_error():
    m = fake_manifest({})

    class Broken(Backend):
        def infer_impl(self, feed):
            return [np.full_like(feed["x"], np.nan)]

    with pytest.raises(Exception, match="non-finite"):
        Broken(m.inputs, m.output_names).infer({"x": np.zeros((1, 1, 4, 4), np.float32),
                                                "t": np.zeros(1, np.float32)})


def test_model_errors_at_run_time_are_one_line(ddpm_bundle, tmp_path):
    """A label past the embedding table (bundle.json claiming more classes than the graph)."""
    copy = tmp_path / "b"
    shutil.copytree(ddpm_bundle.path, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    raw["num_classes"] = 1000
    write_manifest(copy, Manifest.from_dict(raw))
    with Pipeline.from_bundle(copy) as pipe, pytest.raises(Exception, match="onnxruntime failed") as err:
        pipe(1, classes=[500], steps=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,match", [
    (["--out", "{bundle}/g.png"], "inside the bundle"),
    (["--out", "{tmp}/x", "--npz", "{tmp}/x"], "same file"),
    (["--out", "/dev/null"], "not a regular file"),
    (["--guidance", "nan", "--out", "{tmp}/g.png"], "finite"),
    (["--sampler", "ddm", "--out", "{tmp}/g.png"], "cannot drive"),
])
def test_cli_generate_refuses_bad_outputs_before_sampling(ddpm_bundle, tmp_path, capsys, args, match):
    from edgediff.cli import main

    fill = {"bundle": str(ddpm_bundle.path), "tmp": str(tmp_path)}
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(ddpm_bundle.path), "-n", "2", "--steps", "1", *(a.format(**fill) for a in args)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and match in err and "\n" not in err
    assert sorted(p.name for p in ddpm_bundle.path.iterdir()) == ["bundle.json", "model.onnx", "parity.json"]
    assert not list(tmp_path.iterdir())
