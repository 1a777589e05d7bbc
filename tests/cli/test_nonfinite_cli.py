"""Silent garbage is refused: a bundle whose weights hold NaN, guidance scales that blow the
sample up, requests too large for memory and NaN/out-of-range data given to the judge each
stop with one line naming what went wrong (the step, t and output for a model), a non-zero
exit and no output file; ``--allow-nonfinite`` lets a debugging run through."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import numpy_helper

import cli_helpers  # (tests/)
from edgediff.runtime.bundle import read_bundle
from edgediff.runtime.checks import FiniteChecked, NonFinite, check_memory
from edgediff.runtime.errors import InvalidInput


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("bundle") / "uvit"
    export_bundle("uvit", FAMILIES["uvit"].configs["tiny"], out, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def nan_bundle(bundle, tmp_path_factory):
    """The same bundle with NaN in one weight of its model, hashes recorded anew (as a broken
    training run would export it)."""
    out = tmp_path_factory.mktemp("nan") / "uvit"
    shutil.copytree(bundle, out)

    def nan_weight(model):
        init = max(model.graph.initializer, key=lambda i: int(np.prod(i.dims)))     # the largest weight
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] = np.nan
        init.CopyFrom(numpy_helper.from_array(arr, init.name))

    cli_helpers.rewrite_model(out, "fp32", nan_weight)
    return out


def run(args, capsys):
    code, _, err = cli_helpers.run(args, capsys)
    return code, err


CASES = [
    # (id, bundle fixture, extra arguments, what stderr says)
    ("nan weights", "nan_bundle", [], "the model's output 'eps' is not finite at step 1/4 (t = "),
    ("guidance overflows", "bundle", ["--guidance", "1e38"], "guided with w = 1e+38"),
    ("guidance diverges", "bundle", ["--guidance", "1e30"], "the sample diverged before step 2/4"),
    ("guidance nan", "bundle", ["--guidance", "nan"], "guidance must be a finite number"),
    ("guidance inf", "bundle", ["--guidance", "inf"], "guidance must be a finite number"),
    ("classifier scale nan", "bundle", ["--classifier-scale", "nan"], "finite"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_numbers_stop_in_one_line_and_write_nothing(case, request, tmp_path, capsys):
    _, fixture, extra, needle = case
    target = request.getfixturevalue(fixture)
    code, err = run(["generate", str(target), "-n", "3", "--steps", "4", "--out", str(tmp_path / "g.png"),
                     "--npz", str(tmp_path / "g.npz"), *extra], capsys)
    assert code == 1, err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_allow_nonfinite_lets_a_debugging_run_through(nan_bundle, tmp_path, capsys):
    code, err = run(["generate", str(nan_bundle), "-n", "2", "--steps", "3", "--npz", str(tmp_path / "g.npz"),
                     "--allow-nonfinite"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "g.npz") as data:
        assert data["images"].shape[0] == 2


def test_pipeline_refuses_what_memory_cannot_hold(bundle):
    from edgediff import Pipeline

    with Pipeline.from_bundle(bundle) as pipe:
        with pytest.raises(InvalidInput, match=r"need about .* of memory .* lower -n"):
            pipe(10**12)
    assert check_memory(4, 2, [1, 8, 8], available=10**6) > 0
    with pytest.raises(InvalidInput, match="1000 samples at batch 10 need about"):
        check_memory(1000, 10, [3, 64, 64], available=10**6)


def test_finite_check_names_the_step_t_and_output():
    """A real NumPy denoiser whose third call goes wrong; the check counts sampler steps."""
    def denoise(x, t):
        return {"eps": x * (np.nan if t[0] < 500 else 1.0), "v": x}

    checked = FiniteChecked(denoise, steps=5, calls=5, scale=1.0)
    x = np.ones((2, 1, 4, 4), np.float32)
    for t in (900.0, 700.0):
        checked(x, np.full(2, t))
    with pytest.raises(NonFinite, match=r"output 'eps' is not finite at step 3/5 \(t = 300\): 32 of 32"):
        checked(x, np.full(2, 300.0))
    with pytest.raises(NonFinite, match="diverged before step"):
        FiniteChecked(denoise, 5, 5, 1.0)(x * 1e5, np.full(2, 900.0))
    twice = FiniteChecked(denoise, steps=5, calls=10, scale=1.0)        # a 2nd-order sampler: 2 calls a step
    for t in (900.0, 850.0, 800.0, 750.0):
        twice(x, np.full(2, t))
    with pytest.raises(NonFinite, match="step 3/5"):
        twice(x, np.full(2, 100.0))


@pytest.mark.parametrize("images, labels, needle", [
    (np.full((4, 1, 16, 16), np.nan, np.float32), np.arange(4), "NaN/inf: nothing to judge"),
    (np.zeros((4, 1, 16, 16), np.float32), np.array([0, 1, 2, 12]), "labels must be digits 0..9"),
    (np.zeros((4, 1, 16, 16), np.float32), np.array([0.5, 1, 2, 3]), "labels must be integers"),
], ids=["nan images", "label 12", "float labels"])
def test_evaluate_refuses_nan_samples_and_labels_out_of_range(images, labels, needle, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    code, err = run(["evaluate", str(tmp_path / "s.npz")], capsys)
    assert code == 1 and needle in err and err.count("\n") == 1, err


def test_a_manifest_that_misdescribes_its_model_fails_at_load(bundle, tmp_path, capsys):
    """A consistently rewritten bundle.json (hash recomputed) whose sample shape is not the
    graph's: one line naming the input, both shapes, before any sampling."""
    from edgediff.runtime.bundle import write_manifest

    shutil.copytree(bundle, tmp_path / "b")
    m = read_bundle(tmp_path / "b").manifest
    shape = [m.sample_shape[0], 4, 4]
    write_manifest(tmp_path / "b", m.replace(sample_shape=shape, inputs={**m.inputs, "x": {**m.inputs["x"],
                                                                                        "shape": ["batch", *shape]}}))
    code, err = run(["generate", str(tmp_path / "b"), "-n", "2", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 1 and "bundle.json declares 'x' as ['batch', 1, 4, 4] but model.onnx takes" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "g.png").exists()
