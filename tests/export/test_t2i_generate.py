"""Text-to-image generation (U-ViT t2i) from prompts and from precomputed contexts: each
distinct prompt encoded once, ``--prompts-file``, ``--context-npz`` (U-ViT's MS-COCO contexts
and ``empty_context.npy`` null) with or without a text encoder, prompts saved in ``--npz``,
the bundle's recommended guidance (w = 1 + U-ViT's cfg_scale), and every refusal in one line.
Fixtures (tiny t2i bundle, tiny CLIP text encoder): tests/export/conftest.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from edgediff.cli import main  # noqa: E402
from edgediff.runtime import Pipeline  # noqa: E402
from edgediff.runtime.errors import InvalidInput  # noqa: E402
from edgediff.runtime.prompts import TextContexts, distinct, read_prompts_file  # noqa: E402

STEPS = ["--steps", "2"]


def _cli(args, capsys) -> tuple[int, str]:
    """Run ``edgediff ARGS``: (exit code, stderr stripped)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err.strip()


def _refused(args, capsys, *needles) -> str:
    code, err = _cli(args, capsys)
    assert code != 0 and err.startswith("error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _contexts(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, 5, 12)).astype(np.float32)    # tiny_t2i: (K, 5, 12)


def _with_guidance(src, dst, w: float):
    """A copy of a bundle recommending guidance w, its manifest rewritten as writers do."""
    from dataclasses import replace

    from edgediff.runtime.bundle import read_bundle, write_manifest

    shutil.copytree(src, dst)
    m = read_bundle(dst).manifest
    write_manifest(dst, m.replace(sampling=replace(m.sampling, guidance=w)))
    return dst


class _CountingEncoder:
    """Wraps the text encoder backend: records the batch of every call."""

    def __init__(self, backend):
        self.backend, self.rows = backend, []

    def infer(self, feed):
        self.rows.append(len(feed["input_ids"]))
        return self.backend.infer(feed)

    def close(self):
        self.backend.close()


# ---- helpers of runtime/prompts.py -------------------------------------------------------------

def test_distinct_keeps_first_seen_order():
    rows, order = distinct(["cat", "dog", "cat", "", "dog"])
    assert rows == ["cat", "dog", ""] and order.tolist() == [0, 1, 0, 2, 1]


def test_prompts_file_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa cat\r\n\n   \n  café au lait  \na cat\n".encode("utf-8"))
    assert read_prompts_file(f) == ["a cat", "café au lait", "a cat"]


# ---- prompts -----------------------------------------------------------------------------------

def test_repeated_prompts_are_encoded_once_in_the_callers_order(t2i_text, one_thread):
    with Pipeline.from_bundle(t2i_text) as pipe:
        pipe.text_encoder = counting = _CountingEncoder(pipe.text_encoder)
        out = pipe(2, prompt=["cat", "dog", "cat"], steps=2, guidance=3.0, seed=4)
        assert counting.rows == [3]                                 # cat, dog and the empty prompt, once
        assert out.prompts.tolist() == ["cat", "dog"] and out.prompt_index.tolist() == [0, 0, 1, 1, 0, 0]
        tail = pipe(2, prompt="cat", steps=2, guidance=3.0, seed=4, first=4).samples
        np.testing.assert_array_equal(out.samples[4:], tail)        # sample i: its prompt and (seed, i)
        counting.rows.clear()
        pipe(1, prompt=["", "cat"], steps=1, guidance=3.0)
        assert counting.rows == [2]                                 # "" is both a prompt and the null
        counting.rows.clear()
        pipe(1, prompt=["cat"], steps=1)
        assert counting.rows == [1]                                 # unguided: no null to encode


def test_tokenizer_is_built_once_per_pipeline(t2i_text, monkeypatch, one_thread):
    from edgediff.runtime.tokenizer import ClipTokenizer

    built = []
    real = ClipTokenizer.from_dir.__func__
    monkeypatch.setattr(ClipTokenizer, "from_dir", classmethod(lambda cls, *a: built.append(a) or real(cls, *a)))
    with Pipeline.from_bundle(t2i_text) as pipe:
        pipe.encode_prompts(["a cat"])
        pipe(1, prompt=["the word", "a cat"], steps=1, guidance=2.0)
        assert pipe.tokenizer is pipe.tokenizer
    assert len(built) == 1


def test_cli_prompts_file_with_prompts_saves_them_in_the_npz(t2i_text, tmp_path, capsys, one_thread):
    f = tmp_path / "prompts.txt"
    f.write_text("a cat\n\nthe word\na cat\n", "utf-8")
    code, err = _cli(["generate", t2i_text, "-n", "2", *STEPS, "--guidance", "2", "--prompt", "photo",
                      "--prompts-file", f, "--npz", tmp_path / "s.npz", "--out", tmp_path / "g.png"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as data:
        assert data["prompts"].dtype.kind == "U"
        assert data["prompts"].tolist() == ["photo", "a cat", "the word"]
        assert data["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2, 1, 1]
        images = data["images"]
    with Pipeline.from_bundle(t2i_text) as pipe:
        ref = pipe(2, prompt=["photo", "a cat", "the word", "a cat"], steps=2, guidance=2.0)
    np.testing.assert_array_equal(images, ref.images)
    from PIL import Image

    with Image.open(tmp_path / "g.png") as grid:                  # one row per prompt: 4 rows of 2
        assert grid.size == ((2 * 10 + 2) * 16, (4 * 10 + 2) * 16)


def test_cli_prompts_file_refusals(t2i_text, tmp_path, capsys):
    out = ["--npz", tmp_path / "s.npz"]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", "utf-8")
    _refused(["generate", t2i_text, *out, "--prompts-file", blank], capsys, str(blank), "no prompts")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    _refused(["generate", t2i_text, *out, "--prompts-file", latin], capsys, str(latin), "not UTF-8")
    _refused(["generate", t2i_text, *out, "--prompts-file", tmp_path / "missing.txt"], capsys, "does not exist")
    assert not (tmp_path / "s.npz").exists()


# ---- precomputed contexts ----------------------------------------------------------------------

def test_contexts_equal_the_prompts_they_came_from(t2i_text, one_thread):
    with Pipeline.from_bundle(t2i_text) as pipe:
        encoded = pipe.encode_prompts(["cat", "dog", ""])                    # the batch the prompt path runs
        by_prompt = pipe(2, prompt=["cat", "dog"], steps=2, guidance=3.0, seed=1)
        by_context = pipe(2, context=encoded[:2], null_context=encoded[2], steps=2, guidance=3.0, seed=1)
        np.testing.assert_array_equal(by_context.samples, by_prompt.samples)
        assert by_context.prompts is None and by_context.prompt_index.tolist() == [0, 0, 1, 1]
        # no null given: the bundle's text encoder encodes the empty prompt
        pipe.text_encoder = counting = _CountingEncoder(pipe.text_encoder)
        own_null = pipe(2, context=encoded[:2], steps=2, guidance=3.0, seed=1)
        assert counting.rows == [1]
        np.testing.assert_allclose(own_null.samples, by_prompt.samples, rtol=1e-5, atol=1e-5)
        labelled = pipe(1, context=TextContexts(encoded[:2], encoded[2:], ["cat", "dog"]), steps=1, guidance=3.0)
        assert labelled.prompts.tolist() == ["cat", "dog"]


def test_contexts_without_a_text_encoder(t2i_bundle, tmp_path, one_thread):
    context, null = _contexts(2), _contexts(1, seed=9)[0]                  # null as (L, D), like empty_context.npy
    with Pipeline.from_bundle(t2i_bundle / "b") as pipe:
        assert pipe.text_encoder is None and pipe.context_shape == (5, 12)
        plain = pipe(2, context=context, steps=2)
        guided = pipe(2, context=context, null_context=null, steps=2, guidance=3.0)
        assert plain.samples.shape == (4, 1, 8, 8) and not np.allclose(plain.samples, guided.samples)
        with pytest.raises(InvalidInput, match="needs the null condition.*null_context.*add-text-encoder"):
            pipe(2, context=context, steps=2, guidance=3.0)
    # a bundle that recommends w = 2 (1 + U-ViT's cfg_scale 1): applied when a null is given, else refused
    rec = _with_guidance(t2i_bundle / "b", tmp_path / "rec", 2.0)
    with Pipeline.from_bundle(rec) as pipe:
        default = pipe(2, context=context, null_context=null, steps=2)
        explicit = pipe(2, context=context, null_context=null, steps=2, guidance=2.0)
        off = pipe(2, context=context, null_context=null, steps=2, guidance=1.0)
        np.testing.assert_array_equal(default.samples, explicit.samples)
        assert not np.allclose(default.samples, off.samples)
        with pytest.raises(InvalidInput, match="recommended guidance"):
            pipe(2, context=context, steps=2)


def test_recommended_guidance_applies_to_prompts(t2i_text, tmp_path, one_thread):
    rec = _with_guidance(t2i_text, tmp_path / "rec", 2.0)
    with Pipeline.from_bundle(rec) as pipe:
        default = pipe(2, prompt="a cat", steps=2).samples
        np.testing.assert_array_equal(default, pipe(2, prompt="a cat", steps=2, guidance=2.0).samples)
        assert not np.allclose(default, pipe(2, prompt="a cat", steps=2, guidance=1.0).samples)


@pytest.mark.parametrize("kwargs,match", [
    (dict(context=np.zeros((2, 5, 13), np.float32)), r"\(K, 5, 12\).*got shape \(2, 5, 13\)"),
    (dict(context=np.zeros((5, 12), np.float32)), r"\(K, 5, 12\)"),
    (dict(context=np.zeros((0, 5, 12), np.float32)), "K ≥ 1"),
    (dict(context=np.zeros((2, 5, 12), np.int64)), "must hold floats"),
    (dict(context=np.full((2, 5, 12), np.nan, np.float32)), "NaN"),
    (dict(context=np.zeros((2, 5, 12), np.float32), null_context=np.zeros((2, 5, 12), np.float32)),
     r"null_context must be \(1, 5, 12\) or \(5, 12\)"),
    (dict(context=np.zeros((2, 5, 12), np.float32), null_context=np.full((5, 12), np.inf, np.float32)), "infinite"),
    (dict(null_context=np.zeros((5, 12), np.float32)), "null_context goes with context"),
    (dict(context=TextContexts(np.zeros((2, 5, 12), np.float32)), null_context=np.zeros((5, 12), np.float32)),
     "inside the TextContexts"),
    (dict(context=TextContexts(np.zeros((2, 5, 12), np.float32), None, ["one"])), "1 prompt labels for 2"),
])
def test_context_refusals(t2i_bundle, kwargs, match):
    with Pipeline.from_bundle(t2i_bundle / "b") as pipe, pytest.raises(InvalidInput, match=match):
        pipe(1, steps=1, **kwargs)


def test_text_refusals(t2i_text, fixture_bundle):
    with Pipeline.from_bundle(t2i_text) as pipe:
        with pytest.raises(InvalidInput, match="not both"):
            pipe(1, prompt="x", context=_contexts(1))
        with pytest.raises(InvalidInput, match="not both"):
            pipe(1, prompt="x", cond=np.zeros((1, 1, 8, 8), np.float32))
        with pytest.raises(InvalidInput, match="non-empty list of texts"):
            pipe(1, prompt=[])
    _, _, plain, _ = fixture_bundle("uvit")                               # class-conditional: no text
    with Pipeline.from_bundle(plain) as pipe, pytest.raises(InvalidInput, match="takes no text"):
        pipe(1, context=_contexts(1))


def test_cli_context_npz(t2i_bundle, tmp_path, capsys, one_thread):
    b, f = t2i_bundle / "b", tmp_path / "ctx.npz"
    context, null = _contexts(2), _contexts(1, seed=9)
    np.savez(f, context=context, null_context=null[0], prompts=np.array(["a cat", "the word"]))
    code, err = _cli(["generate", b, "-n", "2", *STEPS, "--guidance", "3", "--context-npz", f,
                      "--npz", tmp_path / "s.npz"], capsys)
    assert code == 0, err
    with Pipeline.from_bundle(b) as pipe:
        ref = pipe(2, context=context, null_context=null, steps=2, guidance=3.0)
    with np.load(tmp_path / "s.npz") as data:
        assert data["prompts"].tolist() == ["a cat", "the word"] and data["prompt_index"].tolist() == [0, 0, 1, 1]
        np.testing.assert_array_equal(data["images"], ref.images)
    np.savez(f, context=context.astype(np.float64))                     # no labels, no null: unguided is fine
    code, err = _cli(["generate", b, "-n", "1", *STEPS, "--context-npz", f, "--npz", tmp_path / "u.npz"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "u.npz") as data:
        assert "prompts" not in data.files and data["prompt_index"].tolist() == [0, 1]


def test_cli_context_npz_refusals(t2i_bundle, fixture_bundle, tmp_path, capsys):
    b, f, out = t2i_bundle / "b", tmp_path / "ctx.npz", ["--npz", tmp_path / "s.npz"]
    run = ["generate", b, *STEPS, *out, "--context-npz", f]
    np.savez(f, context=_contexts(2))
    _refused([*run, "--guidance", "3"], capsys, "null_context", "empty_context.npy", "--guidance 1")
    _refused([*run, "--prompt", "a cat"], capsys, "--context-npz", "drop --prompt")
    _refused([*run, "--prompts-file", f], capsys, "drop --prompt")
    for arrays, needle in [(dict(cond=_contexts(1)), "no array 'context'"),
                           (dict(context=_contexts(2)[:, :, :6]), "got shape (2, 5, 6)"),
                           (dict(context=np.ones((2, 5, 12), np.int32)), "must hold floats"),
                           (dict(context=np.full((2, 5, 12), np.nan, np.float32)), "NaN"),
                           (dict(context=_contexts(2), null_context=_contexts(3)), "'null_context' must be"),
                           (dict(context=_contexts(2), prompts=np.array(["one"])), "'prompts' must be (2,) strings"),
                           (dict(context=_contexts(2), prompts=np.arange(2)), "'prompts' must be (2,) strings")]:
        np.savez(f, **arrays)
        _refused(run, capsys, str(f), needle)
    f.write_bytes(b"not a zip")
    _refused(run, capsys, str(f), "not an .npz")
    np.savez(f, context=_contexts(1))
    _, _, plain, _ = fixture_bundle("uvit")
    _refused(["generate", plain, *out, "--context-npz", f], capsys, "takes no text context")
    assert not (tmp_path / "s.npz").exists()


# ---- the recorded recommendation ---------------------------------------------------------------

def test_recommended_t2i_guidance_is_one_plus_cfg_scale():
    from edgediff.export.bundle import _manifest, recommended_sampling
    from edgediff.export.models.uvit import FAMILY

    def w(config, overrides=None):
        return recommended_sampling("uvit", FAMILY.spec(config), overrides).guidance

    tiny = FAMILY.configs["tiny_t2i"]
    assert w(FAMILY.configs["mscoco_uvit_small"]) == 2.0              # configs/mscoco_uvit_small.py: scale 1
    assert w(FAMILY.configs["mscoco_uvit_small_deep"]) == 2.0
    assert w(FAMILY.configs["imagenet256_uvit_large"]) == pytest.approx(1.4)   # class-conditional, unchanged
    assert w(tiny) == 1.0                                             # trained without guidance
    assert w({**tiny, "cfg": True, "cfg_scale": 0.5}) == 1.5
    assert w({**tiny, "cfg_scale": 0.5}) == 1.0                       # cfg off: the scale is not recorded
    assert w({**tiny, "cfg": True, "cfg_scale": 0.5}, {"guidance": 4.0}) == 4.0   # export_bundle(sampling=...)
    config = {**tiny, "cfg": True, "cfg_scale": 0.5}
    for overrides, want in ((None, 1.5), ({"guidance": 4.0, "steps": 7}, 4.0)):
        manifest = _manifest(FAMILY, config, FAMILY.spec(config), None, 21, None, overrides)
        assert manifest.sampling.guidance == want and "context" in manifest.inputs


def test_t2i_bundles_are_guidable_so_engines_double_the_batch(t2i_bundle, fixture_bundle):
    from edgediff.export.trt_build import BuildOptions, engine_profile
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.engines import BatchProfile

    t2i = read_bundle(t2i_bundle / "b").manifest
    assert t2i.null_label is None and t2i.guidable                     # the null is the empty prompt's context
    assert engine_profile(t2i, BuildOptions(opt_batch=4, max_batch=8)) == BatchProfile(1, 8, 16)
    _, _, plain, _ = fixture_bundle("uvit")
    assert read_bundle(plain).manifest.guidable                        # tiny uvit: cfg, a null label
