"""ddm_cond: DDM-Public's conditional dual U-Net, split into cond_encoder.onnx + model.onnx.

Parity is against an independent transcription (official_ddm_cond.py) with perturbed weights;
the exported pair is held to rung 1 against the unsplit forward, and rung 2 for both graphs.
"""
import json

import pytest
import torch

from edgediff.export.models import FAMILIES, ddm_cond
from edgediff.export.models.validation import ConfigError
from edgediff.runtime.parity import rel_l2

import official_ddm_cond as official  # tests/export/official_ddm_cond.py: the plain transcription (no edgediff code)
from perturb import perturb_

FAMILY = FAMILIES["ddm_cond"]


def _pair(name, seed=0):
    """(ours: CondUnet, transcription) with the same perturbed weights, loaded strictly."""
    cfg = ddm_cond.normalize_config(FAMILY.configs[name])
    torch.manual_seed(seed)
    ref = official.Unet(cfg["dim"], cfg["dim_mults"], cfg["channels"], cfg["window_sizes1"], cfg["window_sizes2"],
                        cfg["fourier_scale"], cfg["cond_net"], cfg["single_channel_cond"],
                        cfg["swin_depths"] or (2, 2, 18, 2), cfg["cond_in_dim"], cfg["small_width"],
                        cfg["small_stride"]).eval()
    perturb_(ref, seed)
    ours = FAMILY.official(FAMILY.build(FAMILY.configs[name]))
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ours.eval(), ref


def _inputs(cfg, batch, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["channels"], *cfg["sample_size"], generator=g)
    cond = torch.rand(batch, ddm_cond.cond_channels(cfg), *cfg["cond_size"], generator=g) * 2 - 1
    return x, torch.full((batch,), t), cond


@pytest.mark.parametrize("name", ["tiny", "tiny-swin"])
def test_matches_the_transcription_and_the_split_equals_the_unsplit(name):
    cfg, ours, ref = _pair(name)
    for t in (1e-4, 0.5, 1.0):
        x, tt, cond = _inputs(cfg, 2, t)
        with torch.inference_mode():
            want = ref(x, tt, cond)
            got = ours(x, tt, cond)
            first, *feats = ours.encode(cond, cfg["sample_size"])
            split = ours.denoise(x, tt, first, feats)
        for w, g, s in zip(want, got, split):
            assert rel_l2(w.numpy(), g.numpy()) <= 1e-5
            assert torch.equal(g, s)


def test_swin_keys_are_the_official_ones():
    keys = set(FAMILY.official(FAMILY.build(FAMILY.configs["tiny-swin"])).state_dict())
    for k in ("init_conv_mask.first_coonv.0.weight", "init_conv_mask.features.0.0.norm1.weight",
              "init_conv_mask.features.0.1.attn.relative_position_index", "init_conv_mask.features.1.reduction.weight",
              "init_conv_mask.head.weight", "relation_layers_down.0.input_conv1.1.running_var",
              "relation_layers_down.0.attentions.0.q_lin.weight", "decouple1.2.q_conv.weight",
              "ups2.0.2.fn.fn.to_out.1.g", "final_conv2.weight", "time_mlp.0.W", "projects.3.weight"):
        assert k in keys, k


def test_single_channel_swin_takes_one_channel():
    cfg = dict(FAMILY.configs["tiny-swin"], single_channel_cond=True, cond_in_dim=1)
    net = FAMILY.official(FAMILY.build(cfg))
    assert net.init_conv_mask.first_coonv[0].weight.shape[1] == 1
    enc = FAMILY.companions(FAMILY.build(cfg), cfg)["cond_encoder"]
    assert enc[1]["cond"]["shape"] == ["batch", 1, 64, 64]


def test_features_are_declared_in_graph_order_with_their_shapes():
    spec = FAMILY.spec(FAMILY.configs["div2k-sr"])
    assert spec.inputs == ("x", "t", *ddm_cond.FEATURES)
    shapes = {n: d["shape"][1:] for n, d in spec.features.items()}
    assert shapes == {"cond_init": [128, 128, 128], "cond_feat0": [128, 128, 128], "cond_feat1": [128, 64, 64],
                      "cond_feat2": [256, 32, 32], "cond_feat3": [512, 16, 16]}
    assert spec.sample_shape == (3, 128, 128) and spec.space == "latent"
    assert spec.extra["cond_encoder"]["cond_shape"] == [3, 512, 512]


def test_sizes_default_from_cond_feature_size():
    official_yaml = {k: v for k, v in FAMILY.configs["duts-saliency-ldm"].items()
                     if k not in ("sample_size", "cond_size", "space")}
    cfg = ddm_cond.normalize_config(official_yaml)
    assert cfg["sample_size"] == [96, 96] and cfg["cond_size"] == [384, 384]


BAD = [
    ({"cond_net": "effnet"}, "cond_net 'effnet' is not supported by this exporter"),
    ({"cond_net": "resnet"}, "cond_net 'resnet' is not supported"),
    ({"dim_mults": [1, 2, 4]}, "dim_mults must have 4 entries"),
    ({"window_sizes1": [[2, 2], [1, 1]]}, "window_sizes1 and window_sizes2 must each be a list of 4"),
    ({"learned_variance": True}, "only the constant-C model is exported"),
    ({"out_mul": 2}, "only the constant-C model is exported"),
    ({"dim": 12}, "resnet_block_groups 8"),
    ({"sample_size": [12, 16]}, "must be divisible by 8"),
    ({"ckpt_path": "/x.pt"}, "ckpt_path must be null (give the weights with --checkpoint)"),
    ({"cond_pe": "false"}, "cond_pe must be true or false"),
    ({"nope": 1}, "unknown config key(s) nope"),
]


@pytest.mark.parametrize("override, expected", BAD)
def test_bad_configs_fail_in_one_line(override, expected):
    with pytest.raises(ConfigError) as err:
        FAMILY.spec(dict(FAMILY.configs["tiny"], **override))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_swin_cond_in_dim_must_match_the_backbone():
    with pytest.raises(ConfigError, match="cond_in_dim 1 disagrees with the Swin backbone"):
        FAMILY.spec(dict(FAMILY.configs["tiny-swin"], cond_in_dim=1))


def test_cond_pe_builds_the_unused_position_tables():
    keys = FAMILY.official(FAMILY.build(dict(FAMILY.configs["tiny"], cond_pe=True, cond_feature_size=[4, 4],
                                             num_pos_feats=8))).state_dict()
    assert keys["cond_pos_embedding.0.row_embed.weight"].shape == (4, 4)
    assert keys["cond_pos_embedding.1.weight"].shape == (16, 16 + 8, 1, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny config with perturbed weights, saved as a DDM trainer checkpoint (model.*,
    ema.ema_model.model.*, a first stage beside it) and exported with the CLI's entry point."""
    from edgediff.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("ddm_cond")
    cfg, ours, ref = _pair("tiny", seed=3)
    sd = ref.state_dict()
    trainer = {"model": {**{f"model.{k}": v for k, v in sd.items()}, "first_stage_model.decoder.conv_in.weight": torch.ones(2)},
               "ema": {**{f"ema_model.model.{k}": v for k, v in sd.items()},
                       **{f"online_model.model.{k}": v + 1 for k, v in sd.items()}, "step": torch.tensor(7)}}
    torch.save(trainer, root / "model-1.pt")
    result = export_bundle("ddm_cond", FAMILY.configs["tiny"], root / "b", checkpoint=root / "model-1.pt",
                           log=lambda m: None)
    return cfg, ref, root, result


@pytest.mark.slow
def test_exported_pair_reproduces_the_transcription(exported):
    from edgediff.runtime import read_bundle
    from edgediff.runtime.backends.ort import OrtBackend

    cfg, ref, root, result = exported
    m = read_bundle(root / "b").manifest
    enc = m.components["cond_encoder"]
    assert list(enc.inputs) == ["cond"] and list(enc.outputs) == list(ddm_cond.FEATURES)
    assert m.input_names == ["x", "t", *enc.outputs] and m.output_names == ["c", "eps"]
    parity = json.loads((root / "b" / "parity.json").read_text())
    assert {"fp32", "cond_encoder.fp32", "pair.fp32"} <= set(parity)
    assert all(parity[k]["passed"] for k in ("fp32", "cond_encoder.fp32", "pair.fp32"))
    with OrtBackend(root / "b" / "cond_encoder.onnx", enc.inputs, enc.output_names) as e, \
            OrtBackend(root / "b" / "model.onnx", m.inputs, m.output_names) as d:
        for batch, t in ((1, 1e-4), (3, 0.5), (2, 1.0)):
            x, tt, cond = _inputs(cfg, batch, t, seed=batch)
            feats = e.infer({"cond": cond.numpy()})
            got = d.infer({"x": x.numpy(), "t": tt.numpy(), **feats})
            with torch.inference_mode():
                want = ref(x, tt, cond)
            for name, w in zip(("c", "eps"), want):
                assert rel_l2(w.numpy(), got[name]) <= 1e-5, (name, t)


@pytest.mark.slow
def test_fp16_for_both_graphs(exported, tmp_path):
    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt (the fp16 extra) is not installed")
    import shutil

    from edgediff.export.fp16 import add_fp16
    from edgediff.runtime import read_bundle

    _, _, root, _ = exported
    shutil.copytree(root / "b", tmp_path / "b")
    for component in ("cond_encoder", "denoiser"):
        parity = add_fp16(tmp_path / "b", checkpoint=root / "model-1.pt", component=component, log=lambda m: None)
        assert parity.passed and parity.worst_rel_l2 <= 5e-3, parity.summary()
    m = read_bundle(tmp_path / "b").manifest
    assert m.models["fp16"] == "model_fp16.onnx"
    assert m.components["cond_encoder"].models["fp16"] == "cond_encoder_fp16.onnx"
    assert "condition encoder" in m.precision["fp16"]["calibration"]["x"]


def test_manifest_refuses_a_mispaired_encoder(tmp_path):
    from edgediff.runtime.manifest import Manifest, ManifestError

    spec = FAMILY.spec(FAMILY.configs["tiny"])
    from edgediff.export.reference import manifest_for

    m = manifest_for("ddm_cond", spec, FAMILY.configs["tiny"]).to_dict()
    with pytest.raises(ManifestError, match="need a cond_encoder component"):
        Manifest.from_dict(m)
    outputs = dict(reversed(list(spec.features.items())))      # same names, wrong order
    m["components"] = {"cond_encoder": {"inputs": {"cond": {"dtype": "float32", "shape": ["batch", 1, 16, 16]}},
                                        "outputs": outputs, "models": {"fp32": "cond_encoder.onnx"}}}
    with pytest.raises(ManifestError, match="must be the denoiser's inputs after x and t, in order"):
        Manifest.from_dict(m)
    m["components"]["cond_encoder"]["outputs"] = dict(spec.features)
    assert Manifest.from_dict(m).components["cond_encoder"].output_names == list(ddm_cond.FEATURES)
