"""Bad output paths and option combinations of `generate` and `export`, table-driven: each case
asserts the exit code, one line on stderr naming the problem, no traceback, no file left behind
and every pre-existing file (the user's, the bundle's) untouched."""

import numpy as np
import pytest

from cli_helpers import run  # (tests/)
from fs_snapshot import snapshot  # (tests/)





@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgediff.export.bundle import export_bundle
    from edgediff.export.models import FAMILIES

    out = tmp_path_factory.mktemp("bundle") / "uvit"
    export_bundle("uvit", FAMILIES["uvit"].configs["tiny"], out, log=lambda m: None)
    return out


@pytest.fixture
def work(tmp_path):
    """The user's directory: a previous grid, and files named like our temporaries."""
    (tmp_path / "old.png").write_bytes(b"a previous grid")
    (tmp_path / ".g.png.tmp").write_text("the user's")
    (tmp_path / ".g.png.abc.tmp").write_text("the user's too")
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "adir").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "old.png")
    return tmp_path


GEN = ["-n", "2", "--steps", "2"]
# (id, arguments after `generate BUNDLE`, exit code, what stderr says)
GENERATE_BAD = [
    ("same path", ["--out", "{w}/x", "--npz", "{w}/x"], 1, "--out and --npz name the same file"),
    ("same path spelled twice", ["--out", "{w}/x.png", "--npz", "{w}/adir/../x.png"], 1, "name the same file"),
    ("same existing file", ["--out", "{w}/old.png", "--npz", "{w}/old.png"], 1, "name the same file"),
    ("npz under a file", ["--out", "{w}/g.png", "--npz", "{w}/afile/sub/s.npz"], 1, "afile is not a directory"),
    ("png under a file", ["--out", "{w}/afile/g.png", "--npz", "{w}/s.npz"], 1, "afile is not a directory"),
    ("npz is a directory", ["--out", "{w}/g.png", "--npz", "{w}/adir"], 2, "is a directory"),
    ("out is a symlink", ["--out", "{w}/link.png"], 1, "symbolic link"),
    ("npz is a symlink", ["--out", "{w}/g.png", "--npz", "{w}/link.png"], 1, "symbolic link"),
    ("npz inside the bundle", ["--out", "{w}/g.png", "--npz", "{b}/s.npz"], 1, "is inside the bundle"),
    ("png over the model", ["--out", "{b}/model.onnx"], 1, "is inside the bundle"),
    ("negative seed", ["--seed", "-1", "--out", "{w}/g.png"], 2, "'--seed'"),
    ("--class with --classes", ["--class", "1", "--classes", "2,3", "--out", "{w}/g.png"], 2,
     "give --class or --classes, not both"),
    ("--class with empty --classes", ["--class", "1", "--classes", "", "--out", "{w}/g.png"], 2,
     "give --class or --classes, not both"),
    ("no output", [], 2, "give --out grid.png and/or --npz samples.npz"),
    ("bad classes", ["--classes", "1,x", "--out", "{w}/g.png"], 2, "Invalid value for --classes"),
]


@pytest.mark.parametrize("case, args, code, message", GENERATE_BAD, ids=[c[0] for c in GENERATE_BAD])
def test_generate_refuses_in_one_line_and_writes_nothing(bundle, work, capsys, case, args, code, message):
    before = snapshot(work, bundle)
    got, out, err = run(["generate", str(bundle), *GEN, *[a.format(w=work, b=bundle) for a in args]], capsys)
    assert got == code, err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "wrote" not in out
    assert snapshot(work, bundle) == before


def test_generate_writes_both_and_leaves_lookalikes(bundle, work, capsys):
    before = snapshot(work)
    code, out, err = run(["generate", str(bundle), *GEN, "--out", str(work / "g.png"), "--npz",
                          str(work / "new" / "s.npz")], capsys)
    assert code == 0, err
    assert out.count("wrote") == 2
    after = snapshot(work)
    assert set(after) - set(before) == {str(work / "g.png"), str(work / "new"), str(work / "new" / "s.npz")}
    assert {k: after[k] for k in before} == before
    assert np.load(work / "new" / "s.npz")["images"].shape[0] == 2


def test_a_failing_npz_write_leaves_no_png(bundle, work, capsys, monkeypatch):
    """The PNG is not written before the .npz fails: both go to temporaries, renamed together."""
    import edgediff.runtime.images as images

    def fail(arrays):
        def write(tmp):
            raise images.InvalidInput("no space left on the device (simulated)")
        return write

    monkeypatch.setattr(images, "_npz_writer", fail)
    before = snapshot(work)
    code, out, err = run(["generate", str(bundle), *GEN, "--out", str(work / "new" / "g.png"), "--npz",
                          str(work / "s.npz")], capsys)
    assert code == 1 and "simulated" in err and err.count("\n") == 1 and "wrote" not in out
    assert snapshot(work) == before


# (id, how --out is prepared, exit code, what stderr says)
EXPORT_BAD = [
    ("out is a symlink to a bundle", "link-bundle", 1, "is a symbolic link"),
    ("out is a dangling symlink", "link-dangling", 1, "is a symbolic link"),
    ("out is a file", "file", 2, "is a file"),
    ("out is someone's directory", "user-dir", 1, "exists and is not a bundle"),
    ("out is the empty current directory", "cwd", 1, "is the current directory or one above it"),
    ("out is above the current directory", "cwd-parent", 1, "is the current directory or one above it"),
]


@pytest.mark.parametrize("case, prepare, code, message", EXPORT_BAD, ids=[c[0] for c in EXPORT_BAD])
def test_export_refuses_an_out_that_is_not_ours(bundle, tmp_path, capsys, monkeypatch, case, prepare, code,
                                                message):
    out = arg = tmp_path / "out"
    if prepare == "cwd":
        out.mkdir()
        monkeypatch.chdir(out)
        arg = "."
    elif prepare == "cwd-parent":
        (out / "sub").mkdir(parents=True)
        monkeypatch.chdir(out / "sub")
        arg = ".."
    elif prepare == "link-bundle":
        out.symlink_to(bundle)
    elif prepare == "link-dangling":
        out.symlink_to(tmp_path / "nowhere")
    elif prepare == "file":
        out.write_text("precious")
    elif prepare == "user-dir":
        out.mkdir()
        (out / "precious.txt").write_text("keep")
    before = snapshot(tmp_path, bundle)
    got, _, err = run(["export", "--family", "uvit", "--size", "tiny", "--out", str(arg)], capsys)
    assert got == code and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path, bundle) == before


def test_failed_export_goes_to_a_fresh_failed_dir(tmp_path, capsys, monkeypatch):
    """A user's OUT.failed (and OUT.failed-2) survive; the failed export lands in OUT.failed-3,
    the existing bundle at OUT is untouched."""
    import edgediff.export.bundle as bundle_mod
    from edgediff.runtime.parity import ParityResult

    def failing(module, spec, path, tolerance, **kw):
        result = ParityResult("pytorch-fp32", "onnx", 1e-5, 1e-4)
        result.add("batch=1", {"eps": np.ones(3)}, {"eps": np.ones(3) * 2})
        return result

    out = tmp_path / "b"
    out.mkdir()
    (out / "bundle.json").write_text("{}")
    for name in ("b.failed", "b.failed-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text(name)
    before = snapshot(tmp_path)
    monkeypatch.setattr(bundle_mod, "validate", failing)
    code, _, err = run(["export", "--family", "uvit", "--size", "tiny", "--out", str(out)], capsys)
    assert code == 1 and "b.failed-3 for inspection" in err.splitlines()[-1] and "Traceback" not in err
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.failed", "b.failed-2", "b.failed-3"]
    assert (tmp_path / "b.failed-3" / "model.onnx").is_file()


def test_failed_fp16_step_of_export_leaves_out_and_keeps_the_attempt_beside_it(bundle, tmp_path, capsys,
                                                                              monkeypatch):
    """export --precision fp16 whose gate fails: the existing OUT is untouched (the new FP32
    bundle is not installed either), the attempt is kept at OUT.fp16.failed, named in the error."""
    import edgediff.export.fp16 as fp16

    def failing(fp32, out, *args, **kw):
        out.write_bytes(b"an fp16 model that misses the gate")
        raise fp16.FP16Error("FP16 misses the gate (simulated)")

    monkeypatch.setattr(fp16, "convert_fp16", failing)
    import shutil

    shutil.copytree(bundle, tmp_path / "b")
    before = snapshot(tmp_path)
    code, out, err = run(["export", "--family", "uvit", "--size", "tiny", "--out", str(tmp_path / "b"),
                          "--precision", "fp16"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"error: FP16 misses the gate (simulated); the last FP16 model tried is in "
                                    f"{tmp_path / 'b.fp16.failed'}")
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "b.fp16.failed" not in k} == before
    assert sorted(p.name for p in (tmp_path / "b.fp16.failed").iterdir()) == ["model_fp16.onnx"]


def test_add_precision_from_inside_the_bundle_stages_beside_it(bundle, tmp_path, capsys, monkeypatch):
    """`add-precision .` run inside the bundle: the stage (and a kept failure) go beside the
    bundle, never into it; the bundle gains only its FP16 model."""
    pytest.importorskip("modelopt")
    import shutil

    shutil.copytree(bundle, tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    code, out, err = run(["add-precision", ".", "--precision", "fp16"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bundle.json", "model.onnx", "model_fp16.onnx",
                                                                 "parity.json"]
