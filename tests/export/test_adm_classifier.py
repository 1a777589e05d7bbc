"""ADM noisy-image classifier (guided-diffusion EncoderUNetModel) and its gradient graph."""
import functools
import inspect
import json
import time

import numpy as np
import pytest
import torch

from edgediff.export import classifier as clf
from edgediff.export.models import adm_classifier as ac
from edgediff.export.models.validation import ConfigError
from edgediff.runtime.schedules import Schedule
from official_adm import OfficialEncoder
from perturb import perturb_

LINEAR = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                               "beta_start": 0.0001, "beta_end": 0.02})


def test_schema_is_the_constructor_signature():
    params = inspect.signature(ac.EncoderUNetModel.__init__).parameters
    signature = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    assert ac.SCHEMA.defaults() == signature
    assert set(ac.SCHEMA.fields) == {k for k in params if k != "self"}


def test_published_classifiers_counts_and_keys():
    """Parameter counts of upstream EncoderUNetModel built by script_util.create_classifier
    (measured once against upstream at 22e0df8); keys and shapes as the transcription's."""
    expected = {"64x64": 65_438_568, "128x128": 42_568_040, "256x256": 54_096_360, "512x512": 54_448_360}
    for name, count in expected.items():
        kw = ac.check_config(ac.CONFIGS[name])
        with torch.device("meta"):
            ours, ref = ac.build(ac.CONFIGS[name]), OfficialEncoder(**kw)
        assert sum(p.numel() for p in ours.parameters()) == count, name
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
               {k: v.shape for k, v in ref.state_dict().items()}, name
    assert ac.CONFIGS["64x64"]["num_res_blocks"] == 4        # the README's --classifier_depth 4
    assert ac.CONFIGS["256x256"]["attention_resolutions"] == [8, 16, 32]


T = ac.CONFIGS["tiny"]
PERTURBED = {
    "attention-ssn-updown": dict(T),
    "adaptive-legacy-conv": dict(T, pool="adaptive", use_scale_shift_norm=False, resblock_updown=False,
                                 num_head_channels=-1, num_heads=2, attention_resolutions=[1, 2]),
    "spatial-new-order": dict(T, pool="spatial", use_new_attention_order=True, channel_mult=[1, 2, 2]),
    "spatial_v2-avgpool": dict(T, pool="spatial_v2", conv_resample=False, resblock_updown=False),
}


@functools.cache
def _perturbed(name):
    torch.manual_seed(0)
    kw = ac.check_config(PERTURBED[name])
    ref = OfficialEncoder(**kw).eval()
    changed = perturb_(ref, seed=1)
    assert any(k.startswith("middle_block.1.proj_out") for k in changed)
    ours = ac.build(PERTURBED[name])
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _feed(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 16, 16, generator=g), torch.tensor([0.0, 500.0, 999.0][:batch]),
            torch.tensor([1, 4, 9][:batch]))


def _autograd(model, x, t, y):
    x = x.clone().requires_grad_(True)
    chosen = torch.log_softmax(model(x, t), dim=-1)[torch.arange(len(y)), y]
    return torch.autograd.grad(chosen.sum(), x)[0]


@pytest.mark.parametrize("name", list(PERTURBED))
def test_logits_and_gradient_match_the_transcription(name, one_thread):
    ours, ref = _perturbed(name)
    x, t, y = _feed()
    with torch.no_grad():
        a, b = ours(x, t), ref(x, t)
    assert a.shape == (3, 10)
    assert torch.equal(a, b), float((a - b).abs().max())
    g = ac.ClassifierGrad(ours)(x, t, y)[0]
    assert torch.allclose(g, _autograd(ref, x, t, y), rtol=0, atol=1e-7)
    assert float(g.norm()) > 0


def test_gradient_is_per_sample(one_thread):
    ours, _ = _perturbed("attention-ssn-updown")
    x, t, y = _feed()
    full = ac.ClassifierGrad(ours)(x, t, y)[0]
    alone = ac.ClassifierGrad(ours)(x[1:2], t[1:2], y[1:2])[0]
    assert torch.allclose(full[1:2], alone, atol=1e-7)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The perturbed tiny classifier's gradient graph (traced once; ~30 s)."""
    torch.set_num_threads(1)
    ours, _ = _perturbed("attention-ssn-updown")
    path = tmp_path_factory.mktemp("grad") / clf.FILE
    view = ac.ClassifierGrad(ours).eval()
    clf.export_grad(view, ac.check_config(T), LINEAR, path)
    return view, path


@pytest.mark.slow
def test_rung1_gradient_graph_matches_torch_autograd(exported, one_thread):
    view, path = exported
    result = clf.validate_grad(view, ac.check_config(T), LINEAR, path)
    assert result.passed and result.worst_rel_l2 <= 1e-4, result.summary()
    assert len(result.cases) == 6
    # the graph holds the backward pass: it is no forward-only graph
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ConvTranspose", "LogSoftmax"} <= ops


@pytest.mark.slow
def test_rung1_catches_a_wrong_gradient(exported, one_thread):
    """The gate compares with the reference: a scaled gradient fails it."""
    view, path = exported

    class Wrong(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.view = view

        def forward(self, x, t, y):
            return (1.01 * self.view(x, t, y)[0],)

    assert not clf.validate_grad(Wrong(), ac.check_config(T), LINEAR, path).passed


def test_avg_pool_and_conv_backward_decompositions_are_exact(one_thread):
    """The two backward operators written as forward ones, against autograd's own."""
    from edgediff.export.classifier_grad import _avg_pool2d_backward, _convolution_backward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    for stride, pad in ((1, 1), (2, 1)):
        w = torch.randn(6, 4, 3, 3, generator=g)
        out = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
        up = torch.randn(out.shape, generator=g)
        (want,) = torch.autograd.grad(out, x, up)
        got = _convolution_backward(up, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1,
                                    [True, False, False])[0]
        assert torch.allclose(got, want, atol=1e-5)
    out = torch.nn.functional.avg_pool2d(x, 2, 2)
    up = torch.randn(out.shape, generator=g)
    (want,) = torch.autograd.grad(out, x, up)
    assert torch.allclose(_avg_pool2d_backward(up, x, [2, 2], [2, 2], [0, 0], False, True, None), want, atol=1e-7)


BAD = [
    ({"pool": "max"}, "pool must be one of"),
    ({"num_head_channels": -1}, "pool 'attention' needs num_head_channels"),
    ({"num_head_channels": 48}, "num_head_channels 48 must divide the attention width 64"),
    ({"attention_resolutions": [8]}, "attention_resolutions [8] are downsample factors"),
    ({"num_classes": 10}, "unknown EncoderUNetModel argument(s): num_classes"),
    ({"out_channels": 1}, "out_channels (the number of classes) must be ≥ 2"),
    ({"model_channels": 48}, "each must be a positive multiple of 32"),
]


@pytest.mark.parametrize("override, expected", BAD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD)])
def test_bad_config_is_one_line(override, expected):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        ac.build(dict(T, **override))
    message = str(err.value)
    assert expected in message and "\n" not in message and message.startswith("adm classifier config: "), message
    assert time.perf_counter() - start < 1.0


def test_official_pt_state_dict_loads_strictly_and_mismatches_are_one_line(tmp_path):
    ours, ref = _perturbed("attention-ssn-updown")
    torch.save(ref.state_dict(), tmp_path / "classifier.pt")
    loaded = clf.load_classifier(T, tmp_path / "classifier.pt")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(clf.InvalidInput) as err:
        clf.load_classifier(dict(T, num_res_blocks=2), tmp_path / "classifier.pt")
    assert "missing" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_add_classifier_to_a_bundle_and_its_refusals(fixture_bundle, tmp_path, one_thread):
    from safetensors.torch import save_file

    from edgediff.runtime.bundle import read_bundle

    _, _, bundle, _ = fixture_bundle("adm")             # 3x16x16, 10 classes, linear schedule
    ours, _ = _perturbed("attention-ssn-updown")
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "c.safetensors")
    parity = clf.add_classifier(bundle, tmp_path / "c.safetensors", T, log=lambda m: None)
    assert parity.passed
    m = read_bundle(bundle, verify=True).manifest
    comp = m.component("classifier")
    assert comp.models == {"fp32": clf.FILE} and comp.extra["num_classes"] == 10
    assert comp.inputs["y"]["dtype"] == "int64" and comp.outputs["grad"]["shape"] == ["batch", 3, 16, 16]
    assert "classifier.fp32" in json.loads((bundle / "parity.json").read_text())
    for config, words in ((T, "already has a classifier"),
                          (dict(T, out_channels=7), "the classifier has 7 classes, the model 10"),
                          (dict(T, image_size=32), "the classifier takes [3, 32, 32] images")):
        with pytest.raises(clf.InvalidInput) as err:
            clf.add_classifier(bundle, tmp_path / "c.safetensors", config, log=lambda m: None)
        assert words in str(err.value), str(err.value)
    # the runtime guides with it (torch-free path)
    from edgediff import Pipeline

    with Pipeline.from_bundle(bundle) as pipe:
        base = pipe(n=2, classes=[3], steps=3, sampler="ddim", seed=0)
        guided = pipe(n=2, classes=[3], steps=3, sampler="ddim", seed=0, classifier_scale=50.0)
    assert np.isfinite(guided.samples).all()
    assert not np.allclose(base.samples, guided.samples)

    # rung 2: the FP16 gradient graph against torch.autograd with the same weights
    pytest.importorskip("modelopt")
    from edgediff.export.fp16 import add_fp16

    fp16 = add_fp16(bundle, checkpoint=tmp_path / "c.safetensors", component="classifier", log=lambda m: None)
    assert fp16.passed and fp16.worst_rel_l2 <= 5e-3, fp16.summary()
    comp = read_bundle(bundle, verify=True).manifest.component("classifier")
    assert comp.models["fp16"] == "classifier_fp16.onnx" and comp.parity["fp16"]["passed"]


def test_cli_named_sizes_and_exclusive_options(tmp_path, capsys):
    from edgediff.cli import main
    from edgediff.cli_classifier import NAMED

    assert NAMED == list(ac.CONFIGS)
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "c.json").write_text("{}")
    for extra in (["--size", "tiny", "--config", str(tmp_path / "c.json")], []):
        with pytest.raises(SystemExit) as exc:
            main(["add-classifier", str(tmp_path), "--checkpoint", str(tmp_path / "w.pt"), *extra])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and err == "error: give exactly one of --config FILE or --size NAME"


def test_a_classifier_only_fits_an_eps_model_on_a_discrete_schedule():
    """guided-diffusion's corrections act on ε: a v-prediction bundle is refused when the
    classifier is added, not at every later generate."""
    from edgediff.export.classifier import check_fits
    from edgediff.export.models import FAMILIES
    from edgediff.export.reference import manifest_for
    from edgediff.runtime.errors import InvalidInput

    lucid = FAMILIES["lucid"]
    config = dict(lucid.configs["tiny"], objective="pred_v")
    manifest = manifest_for("lucid", lucid.spec(config), config)
    cfg = dict(ac.check_config(T), in_channels=manifest.sample_shape[0], image_size=manifest.sample_shape[1])
    with pytest.raises(InvalidInput, match="predicts eps"):
        check_fits(cfg, manifest)
    config = dict(lucid.configs["tiny"], objective="pred_noise")
    check_fits(cfg, manifest_for("lucid", lucid.spec(config), config))
