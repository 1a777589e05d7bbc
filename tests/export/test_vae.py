"""Autoencoder companions of latent bundles (export/vae.py, export/vae_layouts.py).

Tiny configs and perturbed weights (tests/export/perturb.py): diffusers' AutoencoderKL is the
reference for the diffusers layout; official_ldm_vae.py (an independent transcription of the
CompVis first-stage autoencoder with the official key names, checked bit for bit against the
official file) is the reference for the LDM layout, so diffusers' key conversion is tested
against code it does not share.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgediff.cli import main
from edgediff.export import vae as vae_mod
from edgediff.export.vae_layouts import LDM_SCHEMA, build_vae, ldm_to_diffusers_config, read_vae
from edgediff.runtime import read_bundle
from edgediff.runtime.backends import load_backend
from edgediff.runtime.bundle import write_manifest
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.parity import rel_l2

import official_ldm_vae as official  # tests/export/official_ldm_vae.py: transcribed CompVis layers (no edgediff code)
from perturb import perturb_

diffusers = pytest.importorskip("diffusers")

SCALE = 0.18215
DIFFUSERS_CFG = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                     latent_channels=4, sample_size=16)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
DIT_CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _diffusers_vae(seed=0, **changes):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**{**DIFFUSERS_CFG, **changes})
    assert perturb_(vae, seed)              # GroupNorm scales and biases were all ones / zeros
    return vae.eval()


def _official_vae(ddconfig=DDCONFIG, seed=0):
    torch.manual_seed(seed)
    vae = official.AutoencoderKL(ddconfig, ddconfig["z_channels"])
    assert perturb_(vae, seed)
    return vae.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Module-wide files: the perturbed diffusers VAE (saved as save_pretrained does) and a
    latent DiT bundle exported with it in one step by `edgediff export --vae`."""
    root = tmp_path_factory.mktemp("vae")
    vae = _diffusers_vae()
    vae.save_pretrained(root / "vae")
    (root / "dit.json").write_text(json.dumps(DIT_CFG))
    with pytest.raises(SystemExit) as exc:
        main(["export", "--family", "dit", "--config", str(root / "dit.json"), "--out", str(root / "b"),
              "--vae", str(root / "vae")])
    assert exc.value.code == 0
    return {"root": root, "vae": vae}


@pytest.fixture
def bundle(store, tmp_path):
    """A private copy of the latent DiT bundle with its autoencoder."""
    shutil.copytree(store["root"] / "b", tmp_path / "b")
    return tmp_path / "b"


def _latent_bundle_without_vae(bundle):
    """The same bundle with the autoencoder taken out again (bundle.json rewritten as a writer would)."""
    b = read_bundle(bundle)
    for name in ("decoder.onnx", "encoder.onnx"):
        (bundle / name).unlink()
    files = {k: v for k, v in b.manifest.files.items() if k not in ("decoder.onnx", "encoder.onnx")}
    write_manifest(bundle, b.manifest.replace(components={}, files=files))
    return read_bundle(bundle)


def _listing(path):
    return sorted((p.name, p.stat().st_size) for p in path.iterdir())


# --- diffusers layout --------------------------------------------------------------------------
def test_diffusers_layout_round_trip(bundle, store):
    b = read_bundle(bundle)                                      # every hash verified
    vae, m = store["vae"], b.manifest
    dec, enc = m.component("decoder"), m.component("encoder")
    assert dec.inputs == {"latents": {"dtype": "float32", "shape": ["batch", 4, 8, 8]}}
    assert dec.outputs == {"image": {"dtype": "float32", "shape": ["batch", 3, 16, 16]}}
    assert enc.inputs == {"image": {"dtype": "float32", "shape": ["batch", 3, 16, 16]}} and enc.models == {
        "fp32": "encoder.onnx"}
    assert dec.extra["scaling_factor"] == SCALE and dec.extra["layout"] == "diffusers"
    assert dec.extra["source"]["checkpoint"] == "diffusion_pytorch_model.safetensors"
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["decoder.fp32"]["passed"] and parity["encoder.fp32"]["passed"] and "fp32" in parity

    rng = np.random.default_rng(5)
    latents = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    image = rng.uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref_img = vae.decode(torch.from_numpy(latents) / SCALE).sample.numpy()
        ref_lat = (vae.encode(torch.from_numpy(image)).latent_dist.mean * SCALE).numpy()
    got_img = load_backend(b, "ort", component="decoder").infer({"latents": latents})["image"]
    got_lat = load_backend(b, "ort", component="encoder").infer({"image": image})["latents"]
    assert rel_l2(ref_img, got_img) <= 1e-5 and rel_l2(ref_lat, got_lat) <= 1e-5
    assert np.abs(ref_img).mean() > 0.05 and ref_lat.std() > 0.01         # not a degenerate model


def test_pipeline_decodes_a_latent_dit(bundle):
    from edgediff import Pipeline
    from edgediff.runtime.images import to_uint8

    with Pipeline.from_bundle(bundle) as pipe:
        out = pipe(n=2)                              # the bundle's recommended sampling
        assert out.samples.shape == (2, 4, 8, 8) and out.images.shape == (2, 16, 16, 3)
        assert out.images.dtype == np.uint8
        direct = pipe.decoder.infer({"latents": out.samples})["image"]
    np.testing.assert_array_equal(out.images, to_uint8(direct))


def test_old_diffusers_attention_names_are_read(store, tmp_path):
    """sd-vae-ft-ema/-mse files still name the mid-block attention query/key/value/proj_attn."""
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in store["vae"].state_dict().items()}
    assert any(".query." in k for k in old)
    save_file(old, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(store["root"] / "vae" / "config.json", tmp_path / "config.json")
    src = read_vae(tmp_path / "diffusion_pytorch_model.safetensors")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(build_vae(src.config, src.state).decode(x).sample, store["vae"].decode(x).sample)


# --- LDM layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("ddconfig", [DDCONFIG, dict(DDCONFIG, ch_mult=[1, 2, 2], num_res_blocks=2, z_channels=3)])
def test_ldm_keys_map_onto_diffusers(ddconfig, tmp_path):
    """diffusers' converter + strict load against the CompVis code, in float64: every key
    placed (a swapped or transposed tensor would show at 1e-12)."""
    ref = _official_vae(ddconfig).double()
    save_file({f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    (tmp_path / "c.json").write_text(json.dumps({"embed_dim": ddconfig["z_channels"], "ddconfig": ddconfig}))
    src = read_vae(tmp_path / "w.safetensors", tmp_path / "c.json")
    assert src.layout == "ldm" and src.prefix == "first_stage_model." and src.scaling_factor is None
    vae = build_vae(src.config, src.state).double()
    img, z = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1, torch.randn(2, ddconfig["z_channels"], 4, 4,
                                                                              dtype=torch.float64)
    with torch.no_grad():
        assert rel_l2(ref.encode_mode(img).numpy(), vae.encode(img).latent_dist.mean.numpy()) < 1e-12
        assert rel_l2(ref.decode(z).numpy(), vae.decode(z).sample.numpy()) < 1e-12


def test_ldm_layout_through_the_cli(bundle, tmp_path, capsys):
    """A whole-model .ckpt (denoiser, loss, scale_factor beside first_stage_model.*) read
    weights-only; ONNX vs the CompVis code at rel-L2 ≤ 1e-5."""
    _latent_bundle_without_vae(bundle)
    ref = _official_vae()
    state = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    state.update({"first_stage_model.loss.logvar": torch.zeros(()), "model.diffusion_model.w": torch.ones(3),
                  "scale_factor": torch.tensor(SCALE)})
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "ldm.ckpt")
    (tmp_path / "first_stage.json").write_text(json.dumps({"model": {"params": {"embed_dim": 4,
                                                                                "ddconfig": DDCONFIG}}}))
    code, out, err = _cli(["add-vae", str(bundle), "--checkpoint", str(tmp_path / "ldm.ckpt"),
                           "--config", str(tmp_path / "first_stage.json")], capsys)
    assert code == 0, err
    assert out.count("PASS") == 2
    b = read_bundle(bundle)
    extra = b.manifest.component("decoder").extra
    assert (extra["layout"], extra["prefix"], extra["scaling_factor_from"]) == ("ldm", "first_stage_model.", "checkpoint")
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    image = rng.uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref_img = ref.decode(torch.from_numpy(latents) / SCALE).numpy()
        ref_lat = (ref.encode_mode(torch.from_numpy(image)) * SCALE).numpy()
    assert rel_l2(ref_img, load_backend(b, "ort", component="decoder").infer({"latents": latents})["image"]) <= 1e-5
    assert rel_l2(ref_lat, load_backend(b, "ort", component="encoder").infer({"image": image})["latents"]) <= 1e-5


def test_ldm_config_errors_name_the_key():
    with pytest.raises(InvalidInput, match="divisible by 32"):
        LDM_SCHEMA.check(dict(DDCONFIG, ch=8))
    with pytest.raises(InvalidInput, match="attention at resolution"):
        LDM_SCHEMA.check(dict(DDCONFIG, attn_resolutions=[8]))
    LDM_SCHEMA.check(dict(DDCONFIG, attn_resolutions=[4], resolution=[16, 16]))     # DDM's [h, w]: no level at 4
    with pytest.raises(InvalidInput, match="embed_dim 3 must equal"):
        ldm_to_diffusers_config({"embed_dim": 3, "ddconfig": DDCONFIG})


# --- refusals ----------------------------------------------------------------------------------
def test_latent_shape_mismatch_leaves_the_bundle_untouched(bundle, tmp_path):
    _latent_bundle_without_vae(bundle)
    _diffusers_vae(latent_channels=3).save_pretrained(tmp_path / "vae3")
    before = _listing(bundle)
    with pytest.raises(InvalidInput, match="3 channels.*has 4"):
        vae_mod.add_vae(bundle, tmp_path / "vae3", log=lambda m: None)
    assert _listing(bundle) == before
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]


def test_cli_refusals_are_one_line_and_leave_nothing(bundle, store, tmp_path, capsys):
    vae_dir = str(store["root"] / "vae")
    code, _, err = _cli(["add-vae", str(bundle), "--checkpoint", vae_dir], capsys)
    assert code == 1 and "already has decoder, encoder" in err
    b = _latent_bundle_without_vae(bundle)
    pixel = b.manifest.replace(space="pixel")
    write_manifest(bundle, pixel)
    before = _listing(bundle)
    code, _, err = _cli(["add-vae", str(bundle), "--checkpoint", vae_dir], capsys)
    assert code == 1 and "pixel-space model" in err and err.startswith("error:") and err.strip().count("\n") == 0
    assert _listing(bundle) == before
    write_manifest(bundle, b.manifest)
    before = _listing(bundle)
    save_file({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    (tmp_path / "bad.json").write_text(json.dumps(dict(DIFFUSERS_CFG, shift_factor=0.1159)))
    for args, expect in ((["--checkpoint", str(tmp_path / "w.safetensors")], "cannot tell the layout"),
                         (["--checkpoint", str(tmp_path / "w.safetensors"), "--layout", "ldm"], "needs --config"),
                         (["--checkpoint", vae_dir, "--config", str(tmp_path / "bad.json")], "shift_factor must be null"),
                         (["--checkpoint", vae_dir, "--layout", "diffusers", "--prefix", "vae."], "under the prefix")):
        code, _, err = _cli(["add-vae", str(bundle), *args], capsys)
        assert code == 1 and expect in err, err
        assert err.startswith("error:") and err.strip().count("\n") == 0 and "Traceback" not in err
    assert _listing(bundle) == before
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "staging left behind"


def test_failed_parity_keeps_the_graphs_aside_and_the_bundle_unchanged(bundle, store, monkeypatch):
    from edgediff.export.bundle import ParityError
    from edgediff.runtime.parity import ParityResult

    _latent_bundle_without_vae(bundle)
    before = _listing(bundle)

    def failing(module, inputs, outputs, path, **kw):
        result = ParityResult("pytorch-fp32", "onnx", 1e-5, 1e-4)
        result.add("batch=1", {n: np.ones(3) for n in outputs}, {n: np.ones(3) * 2 for n in outputs})
        return result
    monkeypatch.setattr(vae_mod, "export_graph", lambda module, args, outs, path, **kw: path.write_bytes(b"x"))
    monkeypatch.setattr(vae_mod, "validate_component", failing)
    with pytest.raises(ParityError, match=r"decoder: FAIL.*b\.vae\.failed"):
        vae_mod.add_vae(bundle, store["root"] / "vae", log=lambda m: None)
    assert _listing(bundle) == before
    assert sorted(p.name for p in (bundle.parent / "b.vae.failed").iterdir()) == ["decoder.onnx", "encoder.onnx"]


def test_scaling_factor_resolution():
    from types import SimpleNamespace as NS

    def source(scale, where="config"):
        return NS(scaling_factor=scale, scaling_from=where if scale is not None else None)

    dit, plain = NS(extra={"latent_scale": SCALE}), NS(extra={})
    assert vae_mod.resolve_scaling(source(None), plain, None) == (SCALE, "default")
    assert vae_mod.resolve_scaling(source(None), NS(extra={"latent_scale_factor": 0.165}), None) == (0.165, "bundle")
    assert vae_mod.resolve_scaling(source(0.13025), plain, None) == (0.13025, "config")
    assert vae_mod.resolve_scaling(source(0.13025), dit, 0.5) == (0.5, "argument")
    assert vae_mod.resolve_scaling(source(0.13025, "checkpoint"), dit, None) == (0.13025, "checkpoint")
    with pytest.raises(InvalidInput, match="positive"):
        vae_mod.resolve_scaling(source(None), dit, -1.0)


# --- FP16 and engines --------------------------------------------------------------------------
def test_fp16_decoder_through_add_precision(bundle, store, tmp_path, capsys):
    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt (the fp16 extra) is not installed")
    code, _, err = _cli(["add-precision", str(bundle), "--precision", "fp16", "--component", "decoder"], capsys)
    assert code == 1 and "pass that checkpoint" in err
    code, out, err = _cli(["add-precision", str(bundle), "--precision", "fp16", "--component", "decoder",
                           "--checkpoint", str(store["root"] / "vae")], capsys)
    assert code == 0, err
    b = read_bundle(bundle)                                       # decoder_fp16.onnx hashed too
    dec = b.manifest.component("decoder")
    assert dec.models == {"fp32": "decoder.onnx", "fp16": "decoder_fp16.onnx"} and "fp16" not in b.manifest.models
    assert dec.parity["fp16"]["passed"] and dec.parity["fp16"]["worst_rel_l2"] <= 5e-3
    assert dec.precision["fp16"]["calibration"]["inputs"].startswith("latents ~ N(0, 1)")
    assert json.loads((bundle / "parity.json").read_text())["decoder.fp16"]["passed"]
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = store["vae"].decode(torch.from_numpy(latents) / SCALE).sample.numpy()
    got = load_backend(b, "ort", "fp16", component="decoder").infer({"latents": latents})["image"]
    assert rel_l2(ref, got) <= 5e-3


def test_engine_options_for_components(bundle):
    from types import SimpleNamespace as NS

    from edgediff.export.trt_build import BuildOptions, build_engine, engine_profile

    guided = NS(null_label=10, guidable=True, max_batch=None)
    assert engine_profile(guided, BuildOptions(opt_batch=4, max_batch=8)).max == 16
    assert engine_profile(guided, BuildOptions(opt_batch=4, max_batch=8, component="decoder")).max == 8
    with pytest.raises(InvalidInput, match="denoiser's batch only"):
        BuildOptions(component="decoder", guidance=True)
    with pytest.raises(InvalidInput, match="no fp16 decoder"):
        build_engine(bundle, BuildOptions(precision="fp16", component="decoder"), log=lambda m: None)
