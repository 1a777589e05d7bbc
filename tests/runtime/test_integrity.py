"""Bundle integrity: the manifest's own hash, path containment, coverage, the legitimate
writers keeping it consistent, and readers racing writers."""
import json
import os
import shutil
import threading

import pytest

from edgediff.runtime.bundle import (BundleAltered, BundleError, finalize_manifest, manifest_digest, read_bundle,
                                     write_manifest)
from edgediff.runtime.manifest import Manifest


def raw_of(path):
    return json.loads((path / "bundle.json").read_text())


def restamp(path, raw):
    """What a forger (or a legitimate writer) does: a consistent integrity record."""
    raw = {k: v for k, v in raw.items() if k != "integrity"}
    raw["integrity"] = {"manifest_sha256": manifest_digest(raw)}
    (path / "bundle.json").write_text(json.dumps(raw))


def test_written_bundles_carry_their_manifest_hash(bundle_copy):
    raw = raw_of(bundle_copy)
    assert raw["schema_version"] == 3 and raw["integrity"]["manifest_sha256"] == manifest_digest(raw)
    # formatting and key order are not content: still the same manifest
    shuffled = dict(reversed(list(raw.items())))
    (bundle_copy / "bundle.json").write_text(json.dumps(shuffled, indent=None, separators=(", ", ": ")))
    assert read_bundle(bundle_copy).manifest.sampling.steps == raw["sampling"]["steps"]


@pytest.mark.parametrize("edit,match", [
    (lambda r: r["sampling"].update(steps=3), "altered after it was written"),
    (lambda r: r["schedule"].update(beta_end=0.03), "altered after it was written"),
    (lambda r: r["files"].update({"parity.json": "0" * 64}), "altered after it was written"),
    (lambda r: r.pop("integrity"), "no integrity record"),
    (lambda r: r["integrity"].update(manifest_sha256="f" * 64), "altered after it was written"),
    (lambda r: r.update(integrity="yes"), "integrity must be"),
])
def test_edited_manifest_is_refused(bundle_copy, edit, match):
    raw = raw_of(bundle_copy)
    edit(raw)
    (bundle_copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=match) as err:
        read_bundle(bundle_copy)
    assert "\n" not in str(err.value) and "bundle.json" in str(err.value)


def test_old_schema_without_hash_is_refused_with_a_re_export_hint(bundle_copy):
    raw = raw_of(bundle_copy)
    raw.pop("integrity")
    raw["schema_version"] = 2
    (bundle_copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="older edgediff .*re-export"):
        read_bundle(bundle_copy)
    assert read_bundle(bundle_copy, verify=False).manifest.schema_version == 2


def test_swapped_model_is_refused(bundle_copy, tiny_bundle):
    (bundle_copy / "model.onnx").write_bytes((tiny_bundle / "parity.json").read_bytes())
    with pytest.raises(BundleAltered, match="sha256 mismatch"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("bad", ["../model.onnx", "/etc/passwd", "a/../model.onnx", "./model.onnx", "a//b",
                                 "a\\..\\b", "C:model.onnx", "", "model.onnx/", ".", "a\x00b", "\ud800", 7, None])
def test_path_tricks_are_refused_in_models_and_files(bundle_copy, bad):
    for where in ("models", "files"):
        raw = raw_of(bundle_copy)
        if where == "models":
            raw["models"]["fp32"] = bad
        elif isinstance(bad, str):
            raw["files"][bad] = "0" * 64
        else:
            continue
        restamp(bundle_copy, raw)
        with pytest.raises(BundleError, match="must be relative, normalised and inside the bundle") as err:
            read_bundle(bundle_copy, verify=False)       # refused even unverified: the runtime opens them
        assert "\n" not in str(err.value)


def test_symlinks_out_of_the_bundle_are_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(bundle_copy / "model.onnx", outside / "model.onnx")
    (bundle_copy / "link").symlink_to(outside)
    raw = raw_of(bundle_copy)
    raw["models"]["fp32"] = "link/model.onnx"
    raw["files"]["link/model.onnx"] = raw["files"]["model.onnx"]
    restamp(bundle_copy, raw)
    with pytest.raises(BundleError, match="leave the bundle through a symlink: link/model.onnx"):
        read_bundle(bundle_copy)
    (bundle_copy / "link").unlink()
    os.replace(bundle_copy / "model.onnx", outside / "m2.onnx")
    (bundle_copy / "model.onnx").symlink_to(outside / "m2.onnx")       # the model file itself a link out
    raw["models"]["fp32"] = "model.onnx"
    finalize_manifest(bundle_copy, Manifest.from_dict(raw))
    with pytest.raises(BundleError, match="leave the bundle through a symlink: model.onnx"):
        read_bundle(bundle_copy)


def test_uncovered_external_data_and_tokenizer_files_are_refused(bundle_copy):
    (bundle_copy / "model.onnx.data").write_bytes(b"weights")
    with pytest.raises(BundleAltered, match="not covered.*model.onnx.data"):
        read_bundle(bundle_copy)
    (bundle_copy / "model.onnx.data").unlink()
    raw = raw_of(bundle_copy)
    decl = {"dtype": "int64", "shape": ["batch", 8]}
    (bundle_copy / "te.onnx").write_bytes(b"graph")
    (bundle_copy / "tok").mkdir()
    (bundle_copy / "tok" / "vocab.json").write_text("{}")
    manifest = Manifest.from_dict(raw).replace(components={"text_encoder": Manifest.from_dict(dict(raw, components={
        "text_encoder": {"inputs": {"input_ids": decl}, "outputs": {"last_hidden_state": decl},
                         "models": {"fp32": "te.onnx"}, "extra": {"tokenizer": "tok", "max_length": 8}}}))
        .components["text_encoder"]})
    finalize_manifest(bundle_copy, manifest)
    assert read_bundle(bundle_copy).manifest.referenced_dirs == ["tok"]
    (bundle_copy / "tok" / "merges.txt").write_text("#version\n")        # slipped in after export
    with pytest.raises(BundleAltered, match="not covered.*tok/merges.txt"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
    (b"{", "not valid JSON"),
    (b"[1, 2]", "the manifest must be a JSON object"),
    (b'{"x": 1' + b"0" * 5000 + b"}", "not valid JSON"),
])
def test_unreadable_manifest_names_the_file(bundle_copy, content, match):
    (bundle_copy / "bundle.json").write_bytes(content)
    with pytest.raises(BundleError, match=match) as err:
        read_bundle(bundle_copy)
    assert str(bundle_copy / "bundle.json") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change,match", [
    ({"family": 3}, "family must be a string"),
    ({"max_batch": -2}, "max_batch must be an integer"),
    ({"opset": "21"}, "opset must be an integer"),
    ({"models": {}}, "names no model file"),
    ({"files": {"model.onnx": "abc"}}, "sha256 hex digest"),
    ({"inputs": {"x": {"dtype": "float32", "shape": ["batch", 1, 8, -8]}}}, "shape entries"),
    ({"surprise": 1}, "unknown key"),
    ({"components": {"classifier": {"inputs": {}, "outputs": {}, "models": {"fp32": "c.onnx"}}}},
     "classifier.extra.num_classes"),
])
def test_types_and_ranges_are_one_line(bundle_copy, change, match):
    raw = raw_of(bundle_copy)
    raw.update(change)
    restamp(bundle_copy, raw)
    with pytest.raises(BundleError, match=match) as err:
        read_bundle(bundle_copy)
    assert "\n" not in str(err.value) and "bundle.json" in str(err.value)


def test_install_into_bundle_keeps_the_manifest_consistent(bundle_copy, tmp_path):
    from edgediff.export.bundle import install_into_bundle

    bundle = read_bundle(bundle_copy)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "extra.onnx").write_bytes(b"graph")
    install_into_bundle(bundle, stage, {"extra.fp32": {"passed": True}}, bundle.manifest.replace(
        models={**bundle.manifest.models, "fp16": "extra.onnx"}))
    again = read_bundle(bundle_copy)
    assert again.manifest.models["fp16"] == "extra.onnx" and "extra.onnx" in again.manifest.files
    assert "extra.fp32" in json.loads((bundle_copy / "parity.json").read_text())


# --- readers racing writers ----------------------------------------------------------------
def _writer_during_verification(monkeypatch, write, times=1):
    """Run ``write`` when the reader is between reading bundle.json and hashing the files."""
    import edgediff.runtime.bundle as mod

    real, calls = mod._verify_files, []

    def racing(path, manifest):
        if len(calls) < times:
            calls.append(1)
            write()
        return real(path, manifest)

    monkeypatch.setattr(mod, "_verify_files", racing)
    return calls


def _add_precision_like(path, tag):
    """An in-place writer: replace parity.json, then bundle.json (what install_into_bundle does)."""
    m = read_bundle(path, verify=False).manifest
    (path / "parity.json").write_text(json.dumps({"run": tag}))
    finalize_manifest(path, m.replace(created=tag))


def test_reader_racing_an_in_place_writer_sees_the_new_bundle(bundle_copy, monkeypatch):
    calls = _writer_during_verification(monkeypatch, lambda: _add_precision_like(bundle_copy, "new"))
    assert read_bundle(bundle_copy).manifest.created == "new" and calls == [1]


def test_reader_in_the_writers_rename_window_waits_for_bundle_json(bundle_copy, monkeypatch):
    """parity.json is replaced, bundle.json follows a few ms later: no false "altered"."""
    m = read_bundle(bundle_copy).manifest

    def write():
        (bundle_copy / "parity.json").write_text("{}")
        threading.Timer(0.005, lambda: finalize_manifest(bundle_copy, m.replace(created="late"))).start()

    _writer_during_verification(monkeypatch, write)
    assert read_bundle(bundle_copy).manifest.created == "late"


def test_reader_racing_an_export_over_the_bundle(bundle_copy, tiny_bundle, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    shutil.copytree(tiny_bundle, fresh)
    _add_precision_like(fresh, "fresh")

    def swap():                 # replace_dir: rename the old away, the new in
        bundle_copy.rename(tmp_path / "old")
        fresh.rename(bundle_copy)
        shutil.rmtree(tmp_path / "old")

    _writer_during_verification(monkeypatch, swap)
    assert read_bundle(bundle_copy).manifest.created == "fresh"


def test_a_bundle_that_keeps_changing_is_one_clear_line(bundle_copy, monkeypatch):
    tags = iter(range(100))
    _writer_during_verification(monkeypatch, lambda: _add_precision_like(bundle_copy, f"v{next(tags)}"), times=99)
    with pytest.raises(BundleError, match="kept changing while it was read"):
        read_bundle(bundle_copy)


def test_a_real_alteration_is_still_reported_once_stable(bundle_copy, monkeypatch):
    _writer_during_verification(monkeypatch, lambda: (bundle_copy / "parity.json").write_text("{}"))
    with pytest.raises(BundleAltered, match="sha256 mismatch"):
        read_bundle(bundle_copy)


def test_write_manifest_round_trips(bundle_copy):
    m = read_bundle(bundle_copy).manifest
    write_manifest(bundle_copy, m.replace(created="x"))
    assert read_bundle(bundle_copy).manifest == m.replace(created="x")


def test_signing_without_the_extra_is_one_line(bundle_copy, tmp_path, monkeypatch):
    import sys

    from edgediff.runtime.errors import MissingExtra
    from edgediff.runtime.signing import sign_bundle, verify_signature

    monkeypatch.setitem(sys.modules, "model_signing", None)        # as if not installed
    (bundle_copy / "bundle.sig").write_text("{}")
    for call in (lambda: verify_signature(bundle_copy, tmp_path / "k.pub.pem"),
                 lambda: sign_bundle(bundle_copy, tmp_path / "k.pem")):
        with pytest.raises(MissingExtra, match=r"pip install 'edgediff\[sign\]'"):
            call()
