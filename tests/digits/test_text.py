"""The text-to-image digits model (digits/text.py): its vocabulary and tokenizer files, the
frozen text encoder's contexts during training, the shipped model's bundle (text encoder and
tokenizer inside) drawing the digit a prompt names, and the evaluate command's phrasings."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgediff.digits import data as digits, text, train  # noqa: E402
from edgediff.digits.demo import shipped  # noqa: E402
from edgediff.runtime.errors import InvalidInput  # noqa: E402
from edgediff.runtime.tokenizer import BOS, EOS, ClipTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from official_clip_tokenizer import PlainClipTokenizer  # noqa: E402  (tests/runtime: a plain BPE transcription)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits_vocab")
    text.write_tokenizer(d)
    return d


def test_every_word_of_the_phrasings_is_one_token(vocab_dir):
    vocab = json.loads((vocab_dir / "vocab.json").read_text("utf-8"))
    assert [vocab[BOS], vocab[EOS]] == [len(vocab) - 2, len(vocab) - 1]          # CLIP's layout
    tok = ClipTokenizer.from_dir(vocab_dir, text.MAX_LENGTH)
    inverse = {i: t for t, i in vocab.items()}
    for p in text.prompts():
        ids = tok(p)[0]
        words = p.split()
        assert ids[0] == vocab[BOS] and ids[len(words) + 1] == vocab[EOS], p      # fits MAX_LENGTH
        assert [inverse[i] for i in ids[1:len(words) + 1]] == [w + "</w>" for w in words], p


def test_digit_vocabulary_ids_match_transformers_and_plain_bpe(vocab_dir):
    from transformers import CLIPTokenizer

    prompts = [*text.prompts(), "", "A Handwritten SEVEN!", "the digit 7 and the digit 8 and more words", "zéro"]
    ours = ClipTokenizer.from_dir(vocab_dir, text.MAX_LENGTH)(prompts)
    ref = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))
    want = ref(prompts, max_length=text.MAX_LENGTH, padding="max_length", truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours, np.array(want))
    plain = PlainClipTokenizer(vocab_dir)
    np.testing.assert_array_equal(ours, np.array([plain(p, text.MAX_LENGTH) for p in prompts]))


def test_contexts_are_the_encoded_phrasing_of_each_label_or_the_empty_prompt(one_thread):
    model, tok, config = text.frozen_text_encoder(seed=0)
    contexts = text.PromptContexts(model, tok)
    labels = torch.tensor([7, 0, 3, 7])
    gen = torch.Generator().manual_seed(0)
    drawn = contexts.draw(labels, gen, dropout=0.0)                         # (4, L, D)
    assert drawn.shape == (4, text.MAX_LENGTH, text.WIDTH) and config["hidden_size"] == text.WIDTH
    with torch.no_grad():
        for row, k in zip(drawn, labels.tolist()):
            each = model(input_ids=torch.from_numpy(tok([text.prompt(p, k) for p in text.PHRASINGS]))).last_hidden_state
            assert min(float((row - e).abs().max()) for e in each) < 1e-6   # one phrasing of digit k
        empty = model(input_ids=torch.from_numpy(tok(""))).last_hidden_state[0]
    for row in contexts.draw(labels, gen, dropout=1.0):
        torch.testing.assert_close(row, empty)


def test_text_model_trains_and_saves_its_encoder_and_tokenizer(tmp_path, one_thread):
    from edgediff.export import text_encoder

    result = train.train("uvit_t2i", tmp_path / "t2i", steps=12, threads=1, progress=False, batch=12, warmup=2)
    out = result.path
    assert math.isfinite(result.final_loss)
    losses = result.losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    record = json.loads((out / "train.json").read_text())
    assert "phrasings" in record["data"]["prompts"]
    config = json.loads((out / text.TEXT_DIR / "config.json").read_text())
    module = text_encoder.load(config, out / text.TEXT_DIR / text.TEXT_WEIGHTS)   # published key layout, strict
    fresh, tok, _ = text.frozen_text_encoder(seed=0)                             # the seed's encoder, frozen
    ids = torch.from_numpy(ClipTokenizer.from_dir(out / text.TOKENIZER_DIR, text.MAX_LENGTH)(["the digit 7"]))
    with torch.no_grad():
        torch.testing.assert_close(module(ids)[0], fresh(input_ids=ids).last_hidden_state)


def test_phrasings_must_name_the_digit():
    assert text.check_phrasing("a handwritten {word}") == "a handwritten {word}"
    for bad in ("seven", "the digit {number}", "{0}", "{word"):
        with pytest.raises(InvalidInput, match="must name the digit"):
            text.check_phrasing(bad)


@pytest.fixture(scope="module")
def shipped_bundle(tmp_path_factory):
    from edgediff.digits.demo import ensure_bundle

    torch.set_num_threads(1)
    return ensure_bundle("uvit_t2i", tmp_path_factory.mktemp("t2i") / "digits-uvit_t2i", log=lambda m: None)


def test_shipped_model_is_small_and_its_bundle_carries_the_text_path(shipped_bundle):
    from edgediff.runtime.bundle import read_bundle

    src = shipped("uvit_t2i")
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    assert size <= 5 * 1024 * 1024
    assert json.loads((src / "train.json").read_text())["seconds"] <= 15 * 60
    m = read_bundle(shipped_bundle).manifest
    assert m.inputs["context"]["shape"] == ["batch", text.MAX_LENGTH, text.WIDTH]
    assert {"text_encoder.onnx", "tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(m.files)
    assert m.sampling.guidance == digits.DIGITS_SAMPLING["uvit_t2i"]["guidance"]


def test_shipped_model_draws_the_digit_each_phrasing_names(shipped_bundle):
    """Through the bundle, torch-free: 5 per digit and phrasing at 10 steps (the README
    reports the full figures: 100 per digit at the recommended settings)."""
    results = text.evaluate(shipped_bundle, per_class=5, steps=10)
    assert list(results) == list(text.CHECK_PHRASINGS)
    for phrasing, result in results.items():
        assert result.n == 50 and result.accuracy >= 0.9, (phrasing, result.summary())


def test_evaluate_command_judges_phrasings_and_refuses_bad_ones(shipped_bundle, tmp_path, capsys):
    from edgediff.cli import main

    def run(source, *args):
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", str(source), *args])
        return exc.value.code, capsys.readouterr()

    code, out = run(shipped_bundle, "--per-class", "2", "--steps", "4", "--phrasing", "number {digit}", "--json")
    assert code == 0 and list(json.loads(out.out)) == ["number {digit}"]
    code, out = run(shipped_bundle, "--phrasing", "seven")
    assert code == 1 and "must name the digit" in out.err and "Traceback" not in out.err
    archive = tmp_path / "samples.npz"
    np.savez(archive, images=digits.load().held_x[:4], labels=np.arange(4))
    code, out = run(archive, "--phrasing", "{word}")
    assert code == 2 and "text-to-image bundles only" in out.err


def test_generate_prompt_draws_the_named_digit(shipped_bundle, tmp_path, capsys):
    """The issue's own words: `edgediff generate B --prompt "the digit 7"` draws sevens."""
    from edgediff.cli import main
    from edgediff.digits.judge import forward, load_judge, as_images

    with pytest.raises(SystemExit) as exc:
        main(["generate", str(shipped_bundle), "--prompt", "the digit 7", "--prompt", "a handwritten two",
              "-n", "10", "--steps", "10", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "g.npz")])
    assert exc.value.code == 0, capsys.readouterr().err
    with np.load(tmp_path / "g.npz") as data:
        images, prompts, index = data["images"], data["prompts"], data["prompt_index"]
    assert list(prompts) == ["the digit 7", "a handwritten two"] and list(index) == [0] * 10 + [1] * 10
    guess = forward(load_judge(), as_images(images))[1].argmax(axis=1)
    assert np.mean(guess[:10] == 7) >= 0.9 and np.mean(guess[10:] == 2) >= 0.9, guess
