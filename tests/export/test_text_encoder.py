"""export/text_encoder.py: a CLIPTextModel-layout checkpoint exported into a U-ViT t2i bundle
as ``text_encoder.onnx`` (rung 1 against transformers' module, perturbed weights, tiny config),
with the tokenizer files stored and hashed, and its refusals in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgediff.export import text_encoder as te  # noqa: E402
from edgediff.runtime.bundle import read_bundle  # noqa: E402
from edgediff.runtime.errors import InvalidInput  # noqa: E402
from edgediff.runtime.tokenizer import ClipTokenizer  # noqa: E402
from tiny_clip import CONFIG  # noqa: E402  (the ``t2i`` fixture: tests/export/conftest.py)


def test_rung1_text_encoder_in_the_bundle_with_its_tokenizer(t2i, tmp_path, one_thread):
    import shutil

    root, model, tok = t2i
    shutil.copytree(root / "b", tmp_path / "b")
    from edgediff.cli import main

    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    with pytest.raises(SystemExit) as exc:
        main(["add-text-encoder", str(tmp_path / "b"), "--checkpoint", str(root / "te.safetensors"),
              "--config", str(tmp_path / "c.json"), "--tokenizer", str(tok)])
    assert exc.value.code == 0
    bundle = read_bundle(tmp_path / "b")                           # verifies every hash
    comp = bundle.manifest.component("text_encoder")
    assert comp.parity["fp32"]["passed"] and comp.parity["fp32"]["worst_rel_l2"] <= 1e-5
    assert comp.inputs == {"input_ids": {"dtype": "int64", "shape": ["batch", 5]}}
    assert comp.outputs == {"last_hidden_state": {"dtype": "float32", "shape": ["batch", 5, 12]}}
    assert {"text_encoder.onnx", "tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(bundle.manifest.files)
    assert json.loads((tmp_path / "b" / "parity.json").read_text())["text_encoder.fp32"]["passed"]
    # the stored tokenizer feeds the graph: ORT(ids) equals the perturbed transformers module
    from edgediff.runtime.backends.ort import OrtBackend

    ids = ClipTokenizer.from_dir(tmp_path / "b" / "tokenizer", 5)(["a photo of the cat", "", "word word word word"])
    assert ids.shape == (3, 5) and ids[0, 0] == 524 and ids[1, 1] == 525
    with OrtBackend(bundle.model_path("fp32", "text_encoder"), comp.inputs, list(comp.outputs)) as ort:
        got = ort.infer({"input_ids": ids})["last_hidden_state"]
    with torch.inference_mode():
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5


def test_refusals_are_one_line(t2i, tmp_path, fixture_bundle):
    root, _, tok = t2i
    with pytest.raises(InvalidInput, match="not a text-to-image model"):
        _, _, plain, _ = fixture_bundle("uvit")
        te.add_text_encoder(plain, root / "te.safetensors", CONFIG, log=lambda m: None)
    with pytest.raises(InvalidInput, match="16-wide states"):
        te.add_text_encoder(root / "b", root / "te.safetensors", {**CONFIG, "hidden_size": 16}, log=lambda m: None)
    with pytest.raises(InvalidInput, match="4 positions"):
        te.add_text_encoder(root / "b", root / "te.safetensors", {**CONFIG, "max_position_embeddings": 4},
                            log=lambda m: None)
    with pytest.raises(InvalidInput, match="do not fit the encoder's vocab_size 100"):
        te.add_text_encoder(root / "b", root / "te.safetensors", {**CONFIG, "vocab_size": 100}, tokenizer=tok,
                            log=lambda m: None)
    with pytest.raises(InvalidInput, match="not a CLIPTextModel at this config"):
        te.add_text_encoder(root / "b", root / "te.safetensors", {**CONFIG, "num_hidden_layers": 3},
                            log=lambda m: None)
    with pytest.raises(InvalidInput, match="not a CLIPTextConfig"):
        te.add_text_encoder(root / "b", root / "te.safetensors", {**CONFIG, "hidden_act": 3.5},
                            log=lambda m: None)
    assert "text_encoder" not in read_bundle(root / "b").manifest.components


def test_cli_bad_config_is_one_line(t2i, tmp_path, capsys):
    from edgediff.cli import main

    root, _, _ = t2i
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(SystemExit) as exc:
        main(["add-text-encoder", str(root / "b"), "--checkpoint", str(root / "te.safetensors"),
              "--config", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("error: cannot read") and "\n" not in err


def test_rung2_fp16_text_encoder(t2i, tmp_path, one_thread):
    """``add-precision --component text_encoder``: ModelOpt AutoCast, gated against the
    transformers module rebuilt from the recorded checkpoint (rung 2, rel-L2 ≤ 5e-3)."""
    import shutil

    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt (the fp16 extra) is not installed")
    from edgediff.export import fp16

    root, _, _ = t2i
    shutil.copytree(root / "b", tmp_path / "b")
    te.add_text_encoder(tmp_path / "b", root / "te.safetensors", CONFIG, log=lambda m: None)
    parity = fp16.add_fp16(tmp_path / "b", checkpoint=root / "te.safetensors", component="text_encoder",
                           log=lambda m: None)
    assert parity.passed and 0 < parity.worst_rel_l2 <= 5e-3
    comp = read_bundle(tmp_path / "b").manifest.component("text_encoder")
    assert comp.models == {"fp32": "text_encoder.onnx", "fp16": "text_encoder_fp16.onnx"}


def test_generate_with_prompts_feeds_the_encoded_context(t2i, t2i_text, tmp_path, capsys, one_thread):
    """``generate --prompt``: each prompt is tokenized and encoded once, and its states are the
    ``context`` of every step: the same as feeding ORT(text_encoder)(tokenizer(prompt)) by hand."""
    from edgediff.cli import main
    from edgediff.runtime import Pipeline
    from edgediff.runtime.conditions import ConditionFeatures
    from edgediff.runtime.pipeline import generate

    root = t2i[0]
    prompts = ["a photo of the cat", "word"]
    with Pipeline.from_bundle(t2i_text) as pipe:
        out = pipe(2, prompt=prompts, steps=3, seed=5)
        ids = ClipTokenizer.from_dir(t2i_text / "tokenizer", 5)(prompts)
        context = pipe.text_encoder.infer({"input_ids": ids})["last_hidden_state"]      # (2, 5, 12)
        by_hand = generate(pipe.backend, pipe.manifest, 4, steps=3, seed=5,
                           conditions=ConditionFeatures({"context": context}, np.array([0, 0, 1, 1])))
        with pytest.raises(InvalidInput, match="not both"):
            pipe(1, prompt="x", cond=np.zeros((1, 1, 8, 8), np.float32))
    assert out.samples.shape == (4, 1, 8, 8)
    np.testing.assert_array_equal(out.samples, by_hand.samples)
    assert not np.allclose(out.samples[:2], out.samples[2:])          # the prompt matters
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(t2i_text), "-n", "2", "--steps", "2", "--prompt", "a cat", "--prompt", "the word",
              "--npz", str(tmp_path / "s.npz")])
    assert exc.value.code == 0
    with np.load(tmp_path / "s.npz") as data:
        assert len(data["images"]) == 4
    # a t2i bundle without a text encoder refuses --prompt in one line
    with Pipeline.from_bundle(root / "b") as pipe, pytest.raises(InvalidInput, match="no text encoder"):
        pipe(1, prompt="a cat")


def test_prompt_guidance_uses_the_empty_prompt_as_null(t2i_text, one_thread):
    """U-ViT t2i's classifier-free guidance: ε = ε(∅) + w·(ε(c) − ε(∅)), ∅ the empty prompt's
    context (the runtime's w = 1 + U-ViT's scale)."""
    from edgediff.runtime import Pipeline
    from edgediff.runtime.pipeline import GuidedDenoiser

    with Pipeline.from_bundle(t2i_text) as pipe:
        context = pipe.encode_prompts(["a photo of the cat", ""])               # (2, 5, 12)
        cond, null = context[:1].repeat(2, 0), context[1:]
        x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
        t = np.float32(500)
        guided = GuidedDenoiser(pipe.backend, pipe.manifest, None, 3.0, {"context": cond}, {"context": null})(x, t)
        tt = np.full(2, t, np.float32)
        eps_c = pipe.backend.infer({"x": x, "t": tt, "context": cond})["eps"]
        eps_u = pipe.backend.infer({"x": x, "t": tt, "context": null.repeat(2, 0)})["eps"]
        np.testing.assert_allclose(guided["eps"], eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
        plain = pipe(2, prompt="a photo of the cat", steps=2)
        steered = pipe(2, prompt="a photo of the cat", steps=2, guidance=3.0)
        assert not np.allclose(plain.samples, steered.samples)
        with pytest.raises(InvalidInput, match="null label"):
            GuidedDenoiser(pipe.backend, pipe.manifest, None, 3.0, {"context": cond})
