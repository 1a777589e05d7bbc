"""Table-driven CLI cases of bundle integrity and signing: `edgediff verify`, `sign` and
`generate --public-key` on altered, escaping, malformed, unsigned and re-built bundles. Each
asserts the exit code, one line on stderr without a traceback, the bundle untouched and no
file left behind."""
import json
import shutil

import pytest

from edgediff.runtime.bundle import manifest_digest


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An EC key pair and another (cases that sign or verify signatures need the sign extra)."""
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("cli-keys")
    out = {}
    for name in ("main", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        out[name] = folder / f"{name}.pem"
        out[name].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
        out[name + "_pub"] = folder / f"{name}.pub.pem"
        out[name + "_pub"].write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (folder / "garbage.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    out["garbage"] = folder / "garbage.pem"
    return out


def tree(path):
    """relative path -> bytes (or link target) of everything under ``path``: "untouched" checks."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = ("->" + str(p.readlink())) if p.is_symlink() else p.read_bytes() if p.is_file() else None
    return out


# --- bundle edits ---------------------------------------------------------------------------
def _raw(b):
    return json.loads((b / "bundle.json").read_text())


def _edit(change, stamp=False):
    """Edit bundle.json; ``stamp``: also fix the integrity record, as a forger would."""
    def apply(b):
        raw = _raw(b)
        change(raw)
        if stamp:
            raw.pop("integrity", None)
            raw["integrity"] = {"manifest_sha256": manifest_digest(raw)}
        (b / "bundle.json").write_text(json.dumps(raw))
    return apply


def _bytes(content):
    return lambda b: (b / "bundle.json").write_bytes(content)


def _symlink_out(b):
    (b / "out").symlink_to("/etc")
    _edit(lambda r: (r["models"].update(fp32="out/hostname"), r["files"].update({"out/hostname": "0" * 64})),
          stamp=True)(b)


def _engine(b):
    (b / "engines").mkdir()
    (b / "engines" / "fp16_sm90_trt10.12_b1-16-16_abc.engine").write_bytes(b"plan")


def _engine_with_sidecar(b, corrupt=False):
    from edgediff.runtime.files import sha256_file

    _engine(b)
    engine = b / "engines" / "fp16_sm90_trt10.12_b1-16-16_abc.engine"
    (b / "engines" / (engine.name + ".json")).write_text(json.dumps({"engine_sha256": sha256_file(engine)}))
    if corrupt:
        engine.write_bytes(b"plan, truncated")


def _sign(b, keys):
    from edgediff.runtime.signing import sign_bundle

    sign_bundle(b, keys["main"])


SAMPLING = lambda r: r["sampling"].update(steps=2)  # noqa: E731

CASES = {
    # name: (prepare(bundle), signed first, command template, exit code, expected text)
    "verify ok": (None, False, ["verify", "{b}"], 0, "ok (2 files match bundle.json"),
    "edited sampling": (_edit(SAMPLING), False, ["verify", "{b}"], 1, "altered after it was written"),
    "edited files hash": (_edit(lambda r: r["files"].update({"parity.json": "1" * 64})), False, ["verify", "{b}"], 1,
                          "altered after it was written"),
    "integrity removed": (_edit(lambda r: r.pop("integrity")), False, ["verify", "{b}"], 1, "no integrity record"),
    "old schema": (_edit(lambda r: (r.pop("integrity"), r.update(schema_version=2))), False, ["verify", "{b}"], 1,
                   "older edgediff (schema 2)"),
    "swapped model": (lambda b: (b / "model.onnx").write_bytes(b"onnx?"), False, ["verify", "{b}"], 1,
                      "sha256 mismatch"),
    "model removed": (lambda b: (b / "model.onnx").unlink(), False, ["verify", "{b}"], 1, "bundle file missing"),
    "model ../": (_edit(lambda r: r["models"].update(fp32="../../etc/passwd"), stamp=True), False,
                  ["verify", "{b}"], 1, "inside the bundle"),
    "model absolute": (_edit(lambda r: r["models"].update(fp32="/etc/passwd"), stamp=True), False,
                       ["verify", "{b}"], 1, "inside the bundle"),
    "files backslash": (_edit(lambda r: r["files"].update({"..\\x": "0" * 64}), stamp=True), False,
                        ["verify", "{b}"], 1, "inside the bundle"),
    "symlink out": (_symlink_out, False, ["verify", "{b}"], 1, "leave the bundle through a symlink"),
    "unlisted model": (_edit(lambda r: r["files"].pop("model.onnx"), stamp=True), False, ["verify", "{b}"], 1,
                       "not covered by the manifest's hashes: model.onnx"),
    "invalid utf-8": (_bytes(b'{"family": "\xff"}'), False, ["verify", "{b}"], 1, "bundle.json is not UTF-8"),
    "deeply nested": (_bytes(b"[" * 50_000 + b"]" * 50_000), False, ["verify", "{b}"], 1,
                      "bundle.json is nested too deeply"),
    "inputs list": (_edit(lambda r: r.update(inputs=["x", "t"]), stamp=True), False, ["verify", "{b}"], 1,
                    "inputs must be a JSON object, got list"),
    "num_classes ten": (_edit(lambda r: r.update(num_classes="ten"), stamp=True), False, ["verify", "{b}"], 1,
                        "num_classes must be an integer"),
    "absurd sample_shape": (_edit(lambda r: r.update(sample_shape=[1, 100000, 100000]), stamp=True), False,
                            ["verify", "{b}"], 1, "sample_shape entries"),
    "sample_shape vs model": (_edit(lambda r: r.update(sample_shape=[3, 8, 8]), stamp=True), False,
                              ["verify", "{b}"], 1, "inputs.x must have shape [batch, 3, 8, 8]"),
    "engine ok": (_engine_with_sidecar, False, ["verify", "{b}"], 0, "1 engine(s) match their sidecars"),
    "engine without sidecar": (_engine, False, ["verify", "{b}"], 1, "has no sidecar"),
    "engine altered": (lambda b: _engine_with_sidecar(b, corrupt=True), False, ["verify", "{b}"], 1,
                       "does not match its sidecar's sha256"),
    "engine garbled sidecar": (lambda b: (_engine(b), (b / "engines" / "fp16_sm90_trt10.12_b1-16-16_abc.engine.json")
                                          .write_bytes(b"\xff[")), False, ["verify", "{b}"], 1, "abc.engine"),
    "not a bundle": (lambda b: (b / "bundle.json").unlink(), False, ["verify", "{b}"], 1, "not a bundle"),
    "unsigned, key given": (None, False, ["verify", "{b}", "--public-key", "{main_pub}"], 1, "is not signed"),
    "signed ok": (None, True, ["verify", "{b}", "--public-key", "{main_pub}"], 0, "signature valid"),
    "signed, other key": (None, True, ["verify", "{b}", "--public-key", "{other_pub}"], 1, "does not verify"),
    "signed, engine built": (_engine_with_sidecar, True, ["verify", "{b}", "--public-key", "{main_pub}"], 1,
                             "engines built after signing are not covered: re-sign"),
    "signed, manifest edited": (_edit(SAMPLING, stamp=True), True, ["verify", "{b}", "--public-key", "{main_pub}"],
                                1, "changed bundle.json"),
    "signed, model swapped": (lambda b: (b / "model.onnx").write_bytes(b"x"), True,
                              ["verify", "{b}", "--public-key", "{main_pub}"], 1, "changed model.onnx"),
    "public key missing": (None, True, ["verify", "{b}", "--public-key", "{tmp}/none.pem"], 2, "does not exist"),
    "public key garbage": (None, True, ["verify", "{b}", "--public-key", "{garbage}"], 1, "cannot use public key"),
    "generate unsigned": (None, False, ["generate", "{b}", "-n", "1", "--steps", "1", "--out", "{tmp}/o/g.png",
                                        "--public-key", "{main_pub}"], 1, "is not signed"),
    "generate altered": (_edit(SAMPLING), False, ["generate", "{b}", "-n", "1", "--out", "{tmp}/o/g.png"], 1,
                         "altered after it was written"),
    "generate forged": (_edit(SAMPLING, stamp=True), True, ["generate", "{b}", "-n", "1", "--out", "{tmp}/o/g.png",
                                                            "--public-key", "{main_pub}"], 1, "changed bundle.json"),
    "generate escaping": (_edit(lambda r: r["models"].update(fp32="/etc/passwd"), stamp=True), False,
                          ["generate", "{b}", "-n", "1", "--out", "{tmp}/o/g.png"], 1, "inside the bundle"),
    "generate signed": (None, True, ["generate", "{b}", "-n", "1", "--steps", "1", "--out", "{tmp}/o/g.png",
                                     "--public-key", "{main_pub}"], 0, "1 samples in"),
    "sign altered": (_edit(SAMPLING), False, ["sign", "{b}", "--key", "{main}"], 1, "altered after it was written"),
    "sign bad key": (None, False, ["sign", "{b}", "--key", "{garbage}"], 1, "cannot use private key"),
    "sign missing key": (None, False, ["sign", "{b}", "--key", "{tmp}/none.pem"], 2, "does not exist"),
    "sign ok": (None, False, ["sign", "{b}", "--key", "{main}"], 0, "wrote"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_integrity_cases(name, bundle_copy, tmp_path, capsys, request):
    from edgediff.cli import main

    prepare, signed, template, code, text = CASES[name]
    needs_keys = signed or template[0] == "sign" or "--public-key" in template
    keys = request.getfixturevalue("keys") if needs_keys else {}
    if signed:
        _sign(bundle_copy, keys)
    if prepare:
        prepare(bundle_copy)
    (tmp_path / "o").mkdir()
    fill = {"b": str(bundle_copy), "tmp": str(tmp_path), **{k: str(v) for k, v in keys.items()}}
    before = tree(bundle_copy)
    with pytest.raises(SystemExit) as exit_:
        main([part.format(**fill) for part in template])
    out, err = capsys.readouterr()
    assert exit_.value.code == code, (out, err)
    assert "Traceback" not in out + err
    if code:
        assert err.startswith("error: ") and err.count("\n") == 1 and text in err, err
        assert tree(bundle_copy) == before                      # refused: nothing touched ...
        assert not list((tmp_path / "o").iterdir())             # ... and nothing written
    else:
        assert text in out, out
        if template[0] != "sign":
            assert tree(bundle_copy) == before
    assert not [p for p in bundle_copy.parent.iterdir() if p.name.startswith(".")]


def test_sign_then_build_then_resign_round_trip(bundle_copy, keys, capsys):
    """The documented flow: sign, an engine is built later, verify says re-sign, re-sign, verify."""
    from edgediff.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        return exit_.value.code, capsys.readouterr()

    assert run("sign", bundle_copy, "--key", keys["main"])[0] == 0
    _engine_with_sidecar(bundle_copy)
    code, (_, err) = run("verify", bundle_copy, "--public-key", keys["main_pub"])
    assert code == 1 and f"edgediff sign {bundle_copy} --key" in err
    assert run("sign", bundle_copy, "--key", keys["main"])[0] == 0
    assert run("verify", bundle_copy, "--public-key", keys["main_pub"])[0] == 0
    shutil.rmtree(bundle_copy / "engines")              # removing an engine is a change too
    assert run("verify", bundle_copy, "--public-key", keys["main_pub"])[0] == 1
