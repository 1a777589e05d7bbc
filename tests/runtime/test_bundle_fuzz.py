"""Property-based fuzzing of the bundle reader (hypothesis): random JSON mutations of a real
tiny bundle's bundle.json (with and without a re-computed integrity record), random path
strings in ``models``/``files``/tokenizer dirs, and byte flips. The reader either returns a
bundle or raises BundleError (one line); nothing else, ever."""
import json
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import edgediff.runtime.bundle as bundle_mod
from edgediff.runtime.bundle import BundleError, manifest_digest, read_bundle

FAST = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)
path_atoms = st.sampled_from(["..", ".", "", "model.onnx", "parity.json", "out", "in", "loop", "a", "b.onnx",
                              "\\", "C:", "/", "//", "\x00", "\x7f", "é", "\ud800", " ", "~", "x" * 300])
path_strings = st.one_of(st.text(max_size=20),
                         st.lists(path_atoms, min_size=1, max_size=5).map("/".join),
                         st.lists(path_atoms, min_size=1, max_size=5).map("".join))


@pytest.fixture(scope="module")
def work(tiny_bundle, tmp_path_factory):
    """A copy of the bundle with symlinks that lead out, in, and round in circles."""
    path = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(tiny_bundle, path)
    (path / "out").symlink_to("/")
    (path / "in").symlink_to(".")
    (path / "loop").symlink_to("loop")
    return path, json.loads((path / "bundle.json").read_text()), (path / "bundle.json").read_bytes()


@pytest.fixture(autouse=True)
def no_race_grace(monkeypatch):
    monkeypatch.setattr(bundle_mod, "RACE_GRACE_S", 0.0)      # nothing writes concurrently here


def _paths(raw, trail=()):
    """Every (key path) into the JSON tree."""
    yield trail
    if isinstance(raw, dict):
        for k, v in raw.items():
            yield from _paths(v, (*trail, k))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            yield from _paths(v, (*trail, i))


def _mutate(raw, trail, op, value):
    raw = json.loads(json.dumps(raw))
    if not trail:
        return value if op == "replace" else raw
    parent = raw
    for k in trail[:-1]:
        parent = parent[k]
    key = trail[-1]
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif isinstance(parent, dict):       # "add": a sibling key
        parent[f"{key}_x"] = value
    else:
        parent.insert(key, value)
    return raw


def _stamped(raw):
    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k != "integrity"}
        raw["integrity"] = {"manifest_sha256": manifest_digest(raw)}
    return raw


def _read_expecting_only_bundle_errors(path):
    try:
        bundle = read_bundle(path)
    except BundleError as exc:
        assert "\n" not in str(exc)
        event(" ".join(str(exc).replace(str(path), "B").split()[:4]))     # what refused it (statistics)
        return None
    event("accepted")
    return bundle


def _write(path, raw):
    (path / "bundle.json").write_text(json.dumps(raw))


@settings(FAST, max_examples=800)
@given(data=st.data(), op=st.sampled_from(["replace", "delete", "add"]), value=json_value, stamp=st.booleans())
def test_json_mutations_only_raise_bundle_errors(work, data, op, value, stamp):
    path, original, _ = work
    trail = data.draw(st.sampled_from(list(_paths(original))))
    raw = _mutate(original, trail, op, value)
    _write(path, _stamped(raw) if stamp else raw)
    got = _read_expecting_only_bundle_errors(path)
    if got is not None and not stamp:        # without a fresh record, only an identical manifest passes
        assert json.loads(json.dumps(got.manifest.to_dict())) == {
            k: v for k, v in original.items() if k != "integrity"}


@settings(FAST, max_examples=800)
@given(rel=path_strings, where=st.sampled_from(["model", "file", "component", "tokenizer"]))
def test_random_paths_never_escape_or_crash(work, rel, where):
    path, original, _ = work
    raw = json.loads(json.dumps(original))
    decl = {"dtype": "int64", "shape": ["batch", 8]}
    if where == "model":
        raw["models"]["fp32"] = rel
    elif where == "file":
        raw["files"][rel] = raw["files"]["model.onnx"]
    elif where == "component":
        raw["components"] = {"decoder": {"inputs": {"z": decl}, "outputs": {"image": decl}, "models": {"fp32": rel}}}
    else:
        raw["components"] = {"text_encoder": {"inputs": {"input_ids": decl}, "outputs": {"h": decl},
                                              "models": {"fp32": "model.onnx"},
                                              "extra": {"tokenizer": rel, "max_length": 8}}}
    _write(path, _stamped(raw))
    got = _read_expecting_only_bundle_errors(path)
    if got is not None:      # whatever was accepted resolves inside the bundle
        root = path.resolve()
        for name in [*got.manifest.all_model_files, *got.manifest.files, *got.manifest.referenced_dirs]:
            assert (root / name).resolve().is_relative_to(root), name


@settings(FAST, max_examples=800)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_byte_flips_only_raise_bundle_errors(work, flips, cut):
    path, original, pristine = work
    data = bytearray(pristine)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    if cut is not None:
        data = data[:cut % len(data)]
    (path / "bundle.json").write_bytes(bytes(data))
    got = _read_expecting_only_bundle_errors(path)
    if got is not None:      # a flip that survives (whitespace) must leave the same manifest
        assert json.loads(json.dumps(got.manifest.to_dict())) == {
            k: v for k, v in original.items() if k != "integrity"}
