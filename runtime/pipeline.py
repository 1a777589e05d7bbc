"""The generation loop and the embedded API: a bundle's backend under a NumPy sampler.

    from edgediff import Pipeline
    with Pipeline.from_bundle("build/digits-dit") as pipe:
        out = pipe(n=8, classes=[3], seed=0)          # the bundle's recommended sampling
    out.images                                         # (8, H, W, C) uint8

Classifier-free guidance is done here, never in the graph: the conditional and null-label
halves go through the backend in one batched call and ε = ε_u + w·(ε_c − ε_u). Classifier
guidance (the bundle's ``classifier`` component) wraps that denoiser (:mod:`.guidance`). Noise
is per sample (:mod:`.noise`): results never depend on the batch size. Image-conditioned
bundles (:mod:`.conditions`) encode each condition once and feed its features by name;
text-to-image bundles (:mod:`.prompts`) encode each distinct prompt once, or take
precomputed contexts, and feed them as ``context``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import FiniteChecked, check_memory, check_samples, finite_checks
from .conditions import COND_COMPONENT, ConditionFeatures, check_conditions, encode_conditions
from .engines import engine_batch
from .errors import InvalidInput
from .guidance import ClassifierGuided, classifier_guidance, effective_options
from .images import to_uint8
from .manifest import TEXT_COMPONENT, TEXT_CONTEXT, Manifest
from .noise import SampleNoise
from .prompts import TextContexts, check_context, distinct
from .samplers import DEFAULT_SAMPLER, get_sampler, init_noise_sigma, model_calls, sample
from .self_cond import INPUT as SELF_COND, SelfConditioned

# Outputs that are predictions linear in the model's guess, hence guided; others (DiT's
# variance interpolation `var`) are taken from the conditional half.
GUIDED_OUTPUTS = ("eps", "c", "x0", "v")


class GuidedDenoiser:
    """``denoise(x, t) -> dict`` over a backend, with labels and optional guidance.
    ``extra``: per-sample inputs fed unchanged at every call (condition features);
    ``null_extra``: one row per input of ``extra`` for the unconditional branch of a model
    guided without labels (U-ViT t2i: the empty prompt's context, ε_u = model(x, t, ∅))."""

    def __init__(self, backend, manifest: Manifest, labels: np.ndarray | None = None, guidance: float = 1.0,
                 extra: dict[str, np.ndarray] | None = None, null_extra: dict[str, np.ndarray] | None = None):
        self.backend = backend
        self.extra = extra or {}
        self.null_extra = null_extra or {}
        self.conditional = manifest.conditional
        self.null = manifest.null_label
        if self.conditional and labels is None:
            labels = np.full(1, self.null if self.null is not None else 0, dtype=np.int64)
        if guidance != 1.0 and (not self.conditional or self.null is None) and not self.null_extra:
            raise InvalidInput("guidance needs a class-conditional model with a null label (or a prompt)")
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.guidance = float(guidance)

    def __call__(self, x: np.ndarray, t, **extra) -> dict[str, np.ndarray]:
        """``extra``: further per-sample inputs (``x_self_cond``), the same for both halves,
        beside the fixed ones given at construction (condition features)."""
        extra = {**self.extra, **extra}
        n = x.shape[0]
        t = np.broadcast_to(np.asarray(t, dtype=np.float32), (n,))
        if not self.conditional and (self.guidance == 1.0 or not self.null_extra):
            return self.backend.infer({"x": x, "t": np.ascontiguousarray(t), **extra})
        if not self.conditional:                    # guided by a null context: [cond | null] halves
            null = {k: np.broadcast_to(self.null_extra[k], v.shape) if k in self.null_extra else v
                    for k, v in extra.items()}
            out = self.backend.infer({"x": np.concatenate([x, x]), "t": np.concatenate([t, t]),
                                      **{k: np.concatenate([v, null[k]]) for k, v in extra.items()}})
            return self._combine(out, n)
        y = np.broadcast_to(self.labels, (n,))
        if self.guidance == 1.0:
            return self.backend.infer({"x": x, "t": np.ascontiguousarray(t), "y": np.ascontiguousarray(y), **extra})
        out = self.backend.infer({"x": np.concatenate([x, x]), "t": np.concatenate([t, t]),
                                  "y": np.concatenate([y, np.full(n, self.null, dtype=np.int64)]),
                                  **{k: np.concatenate([v, v]) for k, v in extra.items()}})
        return self._combine(out, n)

    def _combine(self, out: dict, n: int) -> dict:
        """ε_u + w·(ε_c − ε_u) from the [conditional | null] halves of one call."""
        w = np.float32(self.guidance)
        return {k: (v[n:] + w * (v[:n] - v[n:]) if k in GUIDED_OUTPUTS else v[:n]) for k, v in out.items()}


@dataclass
class Generation:
    samples: np.ndarray            # (N, C, H, W) float32 in the model's data space (latents for latent models)
    labels: np.ndarray | None      # (N,) int64
    latent: bool = False
    decoded_images: np.ndarray | None = None   # (N, H, W, C) uint8 from the bundle's decoder
    conditions: np.ndarray | None = None       # (K, C, H, W) float32 condition images in [-1, 1]
    cond_index: np.ndarray | None = None       # (N,) int64: the condition of each sample
    prompts: np.ndarray | None = None          # (K,) str: the prompt of each context row (text-to-image)
    prompt_index: np.ndarray | None = None     # (N,) int64: the context row of each sample

    @property
    def images(self) -> np.ndarray | None:
        """(N, H, W, C) uint8: the samples of a pixel-space model, the decoded latents of a
        latent one; None for latents without a decoder."""
        return self.decoded_images if self.latent else to_uint8(self.samples)


def _decoded_chunks(decoder, latents: np.ndarray, batch: int, allow_nonfinite: bool = False):
    if batch < 1:
        raise InvalidInput(f"the decode batch must be positive, got {batch}")
    for start in range(0, len(latents), batch):
        chunk = np.ascontiguousarray(latents[start:start + batch], dtype=np.float32)
        image = decoder.infer({"latents": chunk})["image"]
        if not allow_nonfinite:
            check_samples(image, f"the decoder's images {start}..{start + len(chunk) - 1}")
        yield image


def decode(decoder, latents: np.ndarray, batch: int = 16, allow_nonfinite: bool = False) -> np.ndarray:
    """Latents -> float32 images in [-1, 1] through a decoder backend, ``batch`` at a time."""
    return np.concatenate(list(_decoded_chunks(decoder, latents, batch, allow_nonfinite)))


def decode_images(decoder, latents: np.ndarray, batch: int = 16, allow_nonfinite: bool = False) -> np.ndarray:
    """Latents -> (N, H, W, C) uint8 images, converted chunk by chunk: only ``batch`` float
    images exist at a time, so peak memory does not grow with N beyond the uint8 result."""
    return np.concatenate([to_uint8(img) for img in _decoded_chunks(decoder, latents, batch, allow_nonfinite)])


@dataclass(frozen=True)
class Settings:
    """Sampling settings after the bundle's recommended defaults filled the gaps."""

    sampler: str
    steps: int
    guidance: float
    options: dict


def resolve_settings(manifest: Manifest, sampler: str | None = None, steps: int | None = None,
                     guidance: float | None = None, **options) -> Settings:
    """User choices, else the bundle's recommended ones, else the schedule kind's usual."""
    schedule = manifest.noise_schedule
    rec = manifest.sampling
    name = sampler or rec.sampler or DEFAULT_SAMPLER[schedule.kind]
    record = get_sampler(name, schedule)
    wanted = {"variance": manifest.option("variance"),
              "clip_sample": manifest.option("clip_sample", manifest.space == "pixel"),
              "use_clipped_model_output": manifest.option("use_clipped_model_output")}
    opts = {k: v for k, v in wanted.items() if k in record.params and v is not None}
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating))):
        raise InvalidInput(f"guidance must be a number, got {guidance!r}")
    w = rec.guidance if guidance is None else float(guidance)
    if not np.isfinite(w):
        raise InvalidInput(f"guidance must be a finite number, got {w}")
    if steps is not None:
        _check_int("steps", steps, 1)
    if w != 1.0 and guidance is None and not manifest.guidable:
        w = 1.0     # a recommended w needs a null: a label, or a text model's empty-prompt context
    return Settings(name, int(rec.steps if steps is None else steps), w, {**opts, **options})


def generate(backend, manifest: Manifest, n: int, *, sampler: str | None = None, steps: int | None = None,
             batch: int = 16, labels: np.ndarray | None = None, guidance: float | None = None, seed: int = 0,
             first: int = 0, progress=None, conditions: ConditionFeatures | None = None, classifier=None,
             classifier_scale: float = 0.0, allow_nonfinite: bool = False, streams=None, **options) -> Generation:
    """Sample ``n`` images (sample indices ``first .. first+n-1``) batch by batch.
    ``progress(k)`` is told of every k model calls. Sample i depends only on (seed, i, options).
    ``conditions``: the encoded condition of each of the ``n`` samples (conditional bundles).
    ``classifier_scale`` ≠ 0 guides with ``classifier`` (a backend of the bundle's classifier).
    Every model call's outputs and the final samples must be finite, and the sample must not
    diverge (:mod:`.checks`), unless ``allow_nonfinite``. ``streams``: each sample's own
    (seed, index) noise stream instead of (seed, first + i) (:meth:`.SampleNoise.of_streams`)."""
    if streams is not None and len(streams) != n:
        raise InvalidInput(f"{len(streams)} noise streams for {n} samples")
    _check_text_context(manifest, conditions)
    s = resolve_settings(manifest, sampler, steps, guidance, **options)
    _check_text_null(manifest, conditions, s.guidance, guidance is None)
    _check_int("batch", batch, 1)
    check_memory(n, batch, manifest.sample_shape, guided=s.guidance != 1.0)
    schedule = manifest.noise_schedule
    guide = classifier_guidance(classifier, classifier_scale, labels, s.sampler)
    scale = init_noise_sigma(s.sampler, schedule, s.steps, **s.options)
    calls = model_calls(s.sampler, schedule, s.steps, **s.options)
    hint = "".join([f"; guided with w = {s.guidance:g}" if s.guidance != 1.0 else "",
                    f"; classifier scale {classifier_scale:g}" if guide else ""])
    guided_options = effective_options(s.sampler, schedule, s.options) if guide else None    # once, not per batch
    chunks = []
    # NaN/inf are caught by the checks (one line naming the step), not by numpy's warnings
    with finite_checks([backend, classifier], not allow_nonfinite), np.errstate(all="ignore"):
        for start in range(0, n, batch):
            size = min(batch, n - start)
            batch_labels = None if labels is None else labels[start:start + size]
            extra = None if conditions is None else conditions.rows(start, start + size)
            null = None if conditions is None else conditions.null
            denoise, opts = GuidedDenoiser(backend, manifest, batch_labels, s.guidance, extra, null), s.options
            if SELF_COND in manifest.inputs:                # fresh state per batch
                denoise = SelfConditioned(denoise, schedule, manifest.option("clip_sample", manifest.space == "pixel"))
            if guide:
                denoise = ClassifierGuided(denoise, classifier, batch_labels, classifier_scale, schedule, s.sampler,
                                           s.steps, guided_options)
                opts = denoise.sampler_options(opts)
            if not allow_nonfinite:
                denoise = FiniteChecked(denoise, s.steps, calls, scale, hint)
            if progress is not None:
                denoise = _Counting(denoise, progress)
            noise = (SampleNoise(seed, range(first + start, first + start + size)) if streams is None
                     else SampleNoise.of_streams(streams[start:start + size]))
            x_T = noise.initial(manifest.sample_shape, scale)
            chunks.append(sample(s.sampler, denoise, x_T, schedule, s.steps, noise=noise, **opts))
            if not allow_nonfinite:
                check_samples(chunks[-1], f"samples {first + start}..{first + start + size - 1}")
    return Generation(np.concatenate(chunks), labels, manifest.space == "latent")


def _check_text_context(manifest: Manifest, conditions: ConditionFeatures | None) -> None:
    """A text-to-image model's ``context`` input must come with the conditions (encoded
    prompts); without them fail in one line, not in a feed mismatch."""
    if TEXT_CONTEXT not in manifest.inputs or (conditions is not None and TEXT_CONTEXT in conditions.features):
        return
    tokens, dim = manifest.inputs[TEXT_CONTEXT]["shape"][1:]
    raise InvalidInput(f"this bundle needs a text context: its {manifest.family} model takes `context`, "
                       f"{tokens}x{dim} text-encoder states per sample (CLIP): give a prompt (--prompt), "
                       "with a text encoder in the bundle (edgediff add-text-encoder), or precomputed "
                       "contexts (--context-npz)")


def _check_text_null(manifest: Manifest, conditions: ConditionFeatures | None, w: float, recommended: bool) -> None:
    """Guiding a text-to-image model needs the null condition, the empty prompt's context
    (U-ViT's t2i sampling: ε(c) + s·(ε(c) − ε(∅))); without one, say where to get it."""
    if TEXT_CONTEXT not in manifest.inputs or w == 1.0 or (conditions is not None and conditions.null):
        return
    why = "the bundle's recommended guidance, U-ViT's cfg_scale + 1" if recommended else "the guidance asked"
    raise InvalidInput(f"guidance w = {w:g} ({why}) needs the null condition, the empty prompt's context: "
                       "add 'null_context' (L, D) to the --context-npz file (U-ViT's MS-COCO empty_context.npy), "
                       "add a text encoder to the bundle to encode \"\" (edgediff add-text-encoder), "
                       "or turn guidance off (--guidance 1)")


class _Counting:
    def __init__(self, denoise, progress):
        self.denoise, self.progress = denoise, progress

    def __call__(self, x, t):
        out = self.denoise(x, t)
        self.progress(1)
        return out


def total_model_calls(manifest: Manifest, n: int, batch: int, **choices) -> int:
    """Denoiser calls ``generate`` makes for these choices (a progress bar's total)."""
    s = resolve_settings(manifest, **choices)
    calls = model_calls(s.sampler, manifest.noise_schedule, s.steps, **s.options)
    return -(-n // batch) * calls


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidInput(f"{name} must be an integer ≥ {low}, got {value!r}")


def resolve_labels(manifest: Manifest, n: int, classes: list[int] | None,
                   classifier_classes: int | None = None, first: int = 0) -> np.ndarray | None:
    """Labels for samples ``first .. first+n-1``: the given classes cycled, or every class in
    turn (so parts drawn with ``first`` equal one run). An unconditional model guided by a
    classifier takes the classifier's classes."""
    if not manifest.conditional and classifier_classes is None:
        if classes:
            kind = "image-conditioned, not class-conditional" if COND_COMPONENT in manifest.components \
                else "unconditional"
            raise InvalidInput(f"this bundle's model is {kind}: drop --class/--classes")
        return None
    k = manifest.num_classes or classifier_classes
    classes = list(classes) if classes else list(range(k))
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < k]
    if bad:
        raise InvalidInput(f"class label(s) {bad} out of range: the model has classes 0..{k - 1}")
    cycle = np.asarray(classes, dtype=np.int64)
    return cycle[(first + np.arange(n)) % len(cycle)]


class Pipeline:
    """A bundle ready to generate: ``Pipeline.from_bundle(path)(n=8, classes=[3])``.

    Torch-free; a context manager that closes its backends. Image-conditioned bundles
    (a ``cond_encoder`` component) take ``cond``: ``pipe(n=4, cond=images)`` draws ``n``
    samples per condition image; text-to-image bundles take ``prompt`` (with the bundle's
    text encoder) or precomputed ``context``: ``n`` samples per prompt or context row."""

    def __init__(self, bundle, backend, decoder=None, cond_encoder=None, classifier=None, text_encoder=None):
        self.bundle, self.backend, self.decoder = bundle, backend, decoder
        self.cond_encoder, self.classifier, self.text_encoder = cond_encoder, classifier, text_encoder
        self._tokenizer = None

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @classmethod
    def from_bundle(cls, path, backend: str = "ort", precision: str = "fp32", device: str = "cpu",
                    threads: int | None = None, gpu: int = 0, max_batch: int = 16, decode_batch: int = 16,
                    verify: bool = True, public_key=None):
        """Open the bundle at ``path`` (hashes verified) on ``backend``; ``max_batch`` and
        ``decode_batch`` are the largest sample and decode batches you will ask for (TensorRT
        picks its engines by them). ``public_key`` (PEM): refuse unless signed by its key."""
        from .backends import load_backend
        from .bundle import read_bundle

        bundle = read_bundle(path, verify=verify, public_key=public_key)
        engine = load_backend(bundle, backend, precision, device=device, threads=threads, gpu=gpu,
                              max_batch=engine_batch(max_batch, bundle.manifest.guidable))

        def companion(name: str, batch: int):
            if name not in bundle.manifest.components:
                return None
            models = bundle.manifest.component(name).models      # a companion may lack this precision
            return load_backend(bundle, backend, precision if precision in models else "fp32", device=device,
                                threads=threads, gpu=gpu, max_batch=batch, component=name)

        return cls(bundle, engine, companion("decoder", decode_batch), companion(COND_COMPONENT, max_batch),
                   companion("classifier", max_batch), companion(TEXT_COMPONENT, max_batch))

    @property
    def image_conditioned(self) -> bool:
        return self.cond_encoder is not None

    @property
    def context_shape(self) -> tuple[int, int] | None:
        """(L, D) of a text-to-image model's ``context`` input (tokens, width); None for others."""
        if TEXT_CONTEXT not in self.manifest.inputs:
            return None
        return tuple(self.manifest.inputs[TEXT_CONTEXT]["shape"][1:])

    def encode_conditions(self, cond: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
        """(K, C, H, W) conditions in [-1, 1] -> their features, one encoder row each."""
        if not self.image_conditioned:
            raise InvalidInput("this bundle's model takes no condition image (it has no cond_encoder)")
        cond = np.asarray(cond)
        check_conditions(cond)
        return encode_conditions(self.cond_encoder, np.ascontiguousarray(cond, dtype=np.float32), batch)

    @property
    def tokenizer(self):
        """The bundle's CLIP tokenizer (``tokenizer/`` files), built on first use and kept."""
        from .tokenizer import ClipTokenizer

        if self._tokenizer is None:
            if self.text_encoder is None:
                raise InvalidInput("this bundle has no text encoder: add one with `edgediff add-text-encoder`")
            comp = self.manifest.component(TEXT_COMPONENT)
            if "tokenizer" not in comp.extra:
                raise InvalidInput("this bundle's text encoder came without tokenizer files: "
                                   "add it again with --tokenizer")
            self._tokenizer = ClipTokenizer.from_dir(self.bundle.path / comp.extra["tokenizer"],
                                                     comp.extra["max_length"])
        return self._tokenizer

    def encode_prompts(self, prompts: list[str], batch: int = 16) -> np.ndarray:
        """Prompts -> the denoiser's ``context`` (K, L, D): the bundle's tokenizer, then its
        text encoder, one row per prompt as given (U-ViT's FrozenCLIPEmbedder: last_hidden_state)."""
        ids = self.tokenizer(list(prompts))                                   # (K, L)
        chunks = [self.text_encoder.infer({"input_ids": ids[i:i + batch]})["last_hidden_state"]
                  for i in range(0, len(ids), batch)]
        return np.concatenate(chunks)                                         # (K, L, D)

    def prompt_contexts(self, prompt, batch: int = 16, guided: bool = False) -> tuple[TextContexts, np.ndarray]:
        """Each distinct prompt encoded once (and the empty prompt, guidance's null, when
        guiding); the row of every given prompt, in the caller's order. A caller that draws a
        run in parts (:mod:`.shards`) passes rows of it back as ``context``: the same bits."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInput("prompt must be text or a non-empty list of texts")
        rows, order = distinct(prompts)
        wanted = rows + ([""] if guided and "" not in rows else [])
        encoded = self.encode_prompts(wanted, batch)                          # (K [+ 1], L, D)
        null = encoded[wanted.index("")][None] if guided else None
        return TextContexts(encoded[:len(rows)], null, rows), order

    def _given_contexts(self, context, null_context, batch: int, guided: bool) -> tuple[TextContexts, np.ndarray]:
        """Precomputed contexts (an array, or a :class:`TextContexts` as ``load_context_npz``
        reads it), checked against the model's (L, D); without a null row, a guided run
        encodes the empty prompt when the bundle has a text encoder."""
        if isinstance(context, TextContexts):
            if null_context is not None:
                raise InvalidInput("give null_context inside the TextContexts, not beside it")
            context, null_context, labels = context.context, context.null, context.prompts
        else:
            labels = None
        shape = self.context_shape
        context = check_context(context, shape, "context")
        null = None if null_context is None else check_context(null_context, shape, "null_context", null=True)
        if labels is not None and len(labels) != len(context):
            raise InvalidInput(f"{len(labels)} prompt labels for {len(context)} context rows")
        if null is None and guided and self.text_encoder is not None:
            null = self.encode_prompts([""], batch)                           # (1, L, D)
        return TextContexts(context, null, labels), np.arange(len(context), dtype=np.int64)

    def _text_conditions(self, n: int, batch: int, guidance: float, prompt, context, null_context):
        if self.context_shape is None:
            raise InvalidInput("this bundle's model takes no text: drop the prompt or context")
        if prompt is not None and (context is not None or null_context is not None):
            raise InvalidInput("give prompts or precomputed contexts, not both")
        if prompt is None and context is None:
            raise InvalidInput("null_context goes with context: give the contexts too")
        guided = guidance != 1.0
        text, order = (self.prompt_contexts(prompt, batch, guided) if prompt is not None
                       else self._given_contexts(context, null_context, batch, guided))
        index = np.repeat(order, n)                   # n samples per prompt or row, in the caller's order
        null = None if text.null is None else {TEXT_CONTEXT: text.null}
        return ConditionFeatures({TEXT_CONTEXT: text.context}, index, null), index, text.prompts

    def _conditions(self, cond, n: int, batch: int, guidance: float, text: tuple):
        """(conditions, per-sample index, prompt labels) for image or text conditions."""
        if any(v is not None for v in text):
            if cond is not None:
                raise InvalidInput("give condition images or a prompt, not both")
            return self._text_conditions(n, batch, guidance, *text)
        if cond is None:
            if self.image_conditioned:
                raise InvalidInput("this bundle's model is image-conditioned: give condition images (--cond)")
            return None, None, None
        features = self.encode_conditions(cond, batch)
        index = np.repeat(np.arange(len(cond), dtype=np.int64), n)     # n samples per condition, in order
        return ConditionFeatures(features, index), index, None

    def __call__(self, n: int = 1, *, classes: list[int] | None = None, guidance: float | None = None,
                 steps: int | None = None, sampler: str | None = None, seed: int = 0, batch: int = 16,
                 first: int = 0, decode_batch: int = 16, progress=None, cond: np.ndarray | None = None,
                 classifier_scale: float = 0.0, prompt: str | list[str] | None = None,
                 context: np.ndarray | TextContexts | None = None, null_context: np.ndarray | None = None,
                 allow_nonfinite: bool = False, **options) -> Generation:
        """Generate ``n`` samples (per condition image, for image-conditioned bundles: ``cond``
        is (K, C, H, W) in [-1, 1], each encoded once); latent bundles with a decoder are
        decoded ``decode_batch`` at a time (``out.images``), latents kept in ``out.samples``.
        ``classifier_scale`` s ≠ 0 adds classifier guidance (the bundle's classifier, :mod:`.guidance`).
        Text-to-image bundles draw ``n`` samples per ``prompt`` (each distinct prompt encoded
        once) or per row of ``context`` (K, L, D) precomputed (or a :class:`TextContexts`);
        guidance's null is ``null_context`` ((1, L, D) or (L, D)), else the empty prompt encoded.
        A NaN/inf model output or sample stops the run (:class:`~.checks.NonFinite`) unless
        ``allow_nonfinite``."""
        for name, value, low in (("n", n, 1), ("batch", batch, 1), ("decode_batch", decode_batch, 1),
                                 ("first", first, 0), ("seed", seed, 0)):
            _check_int(name, value, low)
        w = resolve_settings(self.manifest, sampler, steps, guidance).guidance
        check_memory(n, batch, self.manifest.sample_shape, guided=w != 1.0)   # n per condition: at least n
        conditions, index, prompts = self._conditions(cond, n, batch, w, (prompt, context, null_context))
        total = n if index is None else len(index)
        check_memory(total, batch, self.manifest.sample_shape, guided=w != 1.0)     # before any n-sized array
        guided = bool(classifier_guidance(self.classifier, classifier_scale))
        labels = resolve_labels(self.manifest, total, classes,
                                self.manifest.component("classifier").extra["num_classes"] if guided else None,
                                first)
        out = generate(self.backend, self.manifest, total, sampler=sampler, steps=steps, batch=batch,
                       labels=labels, guidance=guidance, seed=seed, first=first, progress=progress,
                       conditions=conditions, classifier=self.classifier, classifier_scale=classifier_scale,
                       allow_nonfinite=allow_nonfinite, **options)
        if cond is not None:
            out.conditions, out.cond_index = np.asarray(cond, dtype=np.float32), index
        elif index is not None:
            out.prompts = None if prompts is None else np.array(prompts, dtype=str)
            out.prompt_index = index
        if out.latent and self.decoder is not None:
            with finite_checks([self.decoder], not allow_nonfinite), np.errstate(all="ignore"):
                out.decoded_images = decode_images(self.decoder, out.samples, decode_batch, allow_nonfinite)
        return out

    def close(self) -> None:
        for backend in (self.backend, self.decoder, self.cond_encoder, self.classifier, self.text_encoder):
            if backend is not None:
                backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
