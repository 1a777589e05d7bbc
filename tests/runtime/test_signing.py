"""Signing with OpenSSF model-signing (EC keys, offline): sign, verify, refuse, re-sign."""
import json

import pytest

pytest.importorskip("model_signing")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

from edgediff.runtime.bundle import BundleError, read_bundle  # noqa: E402
from edgediff.runtime.signing import SignatureError, sign_bundle, verify_signature  # noqa: E402


def _write_pair(folder, name, key):
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {"main": _write_pair(folder, "main", ec.generate_private_key(ec.SECP256R1())),
            "other": _write_pair(folder, "other", ec.generate_private_key(ec.SECP384R1())),
            "rsa": _write_pair(folder, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))}


@pytest.fixture
def signed(bundle_copy, keys):
    sign_bundle(bundle_copy, keys["main"][0])
    return bundle_copy


def test_sign_then_verify(signed, keys):
    assert (signed / "bundle.sig").is_file()
    verify_signature(signed, keys["main"][1])
    assert read_bundle(signed, public_key=keys["main"][1]).manifest.family == "ddpm"
    assert "bundle.sig" not in read_bundle(signed).manifest.files           # outside the hashes
    assert not [p for p in signed.iterdir() if p.name.startswith(".")]     # no temporary left


def test_unsigned_bundle_is_refused(bundle_copy, keys):
    with pytest.raises(SignatureError, match="is not signed .*edgediff sign"):
        read_bundle(bundle_copy, public_key=keys["main"][1])


def test_another_key_is_refused(signed, keys):
    with pytest.raises(SignatureError, match="does not verify with") as err:
        verify_signature(signed, keys["other"][1])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tamper,match", [
    (lambda b: (b / "bundle.json").write_text((b / "bundle.json").read_text().replace('"steps": 20', '"steps": 2')),
     r"changed bundle.json\); if these changes are yours, re-sign"),
    (lambda b: (b / "model.onnx").write_bytes(b"evil"), "changed model.onnx"),
    (lambda b: (b / "parity.json").unlink(), "missing parity.json"),
    (lambda b: (b / "notes.txt").write_text("x"), "added notes.txt"),
    (lambda b: (b / ".gitattributes").write_text("x"), "added .gitattributes"),     # nothing is ignored
])
def test_changes_after_signing_are_refused(signed, keys, tamper, match):
    tamper(signed)
    with pytest.raises(SignatureError, match=match) as err:
        verify_signature(signed, keys["main"][1])
    assert "\n" not in str(err.value)


def test_engines_built_after_signing_need_a_re_sign(signed, keys):
    engines = signed / "engines"
    engines.mkdir()
    (engines / "fp16_sm90_trt10.12_b1-16-16_abc.engine").write_bytes(b"plan")
    (engines / "fp16_sm90_trt10.12_b1-16-16_abc.engine.json").write_text("{}")
    read_bundle(signed)                                     # the manifest does not cover engines ...
    with pytest.raises(SignatureError, match="engines built after signing are not covered: re-sign it with"):
        verify_signature(signed, keys["main"][1])          # ... the signature does
    sign_bundle(signed, keys["main"][0])
    verify_signature(signed, keys["main"][1])


def test_parity_reports_written_after_signing_keep_the_signature(signed, keys):
    """parity/ is derived evidence rewritten at every `edgediff parity` run: left out of the
    signature (and of the manifest's hashes), so checking a signed bundle does not break it."""
    (signed / "parity").mkdir()
    (signed / "parity" / "fp16-ort-denoiser.json").write_text("{}")
    verify_signature(signed, keys["main"][1])
    (signed / "parity.json").write_text("{}")              # the export-time record is covered
    with pytest.raises(SignatureError, match="changed parity.json"):
        verify_signature(signed, keys["main"][1])


def test_an_altered_bundle_is_never_signed(bundle_copy, keys):
    raw = json.loads((bundle_copy / "bundle.json").read_text())
    raw["sampling"]["steps"] = 2
    (bundle_copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="altered"):
        sign_bundle(bundle_copy, keys["main"][0])
    assert not (bundle_copy / "bundle.sig").exists()


@pytest.mark.parametrize("which,match", [("not_pem", "cannot use private key"), ("public_as_private", "cannot use private key"),
                                         ("rsa", "cannot use private key")])
def test_unusable_private_keys_are_one_line(bundle_copy, keys, tmp_path, which, match):
    key = {"not_pem": tmp_path / "k.pem", "public_as_private": keys["main"][1], "rsa": keys["rsa"][0]}[which]
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(SignatureError, match=match) as err:
        sign_bundle(bundle_copy, key)
    assert "\n" not in str(err.value) and not (bundle_copy / "bundle.sig").exists()


@pytest.mark.parametrize("which", ["not_pem", "private_as_public", "rsa"])
def test_unusable_public_keys_are_one_line(signed, keys, tmp_path, which):
    key = {"not_pem": tmp_path / "k.pem", "private_as_public": keys["main"][0], "rsa": keys["rsa"][1]}[which]
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(SignatureError, match="cannot use public key") as err:
        verify_signature(signed, key)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("garbage", [b"", b"{}", b"\xff\x00", b'{"dsseEnvelope": {"payload": "!!"}}'])
def test_garbage_signature_is_refused(signed, keys, garbage):
    (signed / "bundle.sig").write_bytes(garbage)
    with pytest.raises(SignatureError, match="does not verify") as err:
        verify_signature(signed, keys["main"][1])
    assert "\n" not in str(err.value)


def test_pipeline_refuses_unsigned_and_accepts_signed(bundle_copy, keys):
    from edgediff.runtime import Pipeline

    with pytest.raises(SignatureError, match="not signed"):
        Pipeline.from_bundle(bundle_copy, public_key=keys["main"][1])
    sign_bundle(bundle_copy, keys["main"][0])
    with Pipeline.from_bundle(bundle_copy, public_key=keys["main"][1]) as pipe:
        assert pipe(1, classes=[1], steps=1).images.shape[0] == 1
