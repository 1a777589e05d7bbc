"""Serving a bundle to many users: JSON requests checked one by one, then merged into
denoiser batches. Ray-free; :mod:`.serve_ray` puts an :class:`Engine` behind Ray Serve.

A request asks for ``n`` samples of one class (or prompt) under a seed; its samples are
samples ``first .. first+n-1`` of that seed, each with its own noise stream (:mod:`.noise`),
so a served image is the one ``edgediff generate --seed S --first F --class C`` draws, however
the server batched it. Requests can share a denoiser batch only when everything the batch has
in common agrees (sampler, steps, guidance): :func:`group_key` names that, and
:meth:`Engine.run` draws each group as one batched call of the pipeline.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import numpy as np

from .errors import EdgediffError, InvalidInput
from .images import grid

FORMATS = {"png": "image/png", "npz": "application/x-npz"}
FIELDS = ("class", "prompt", "seed", "first", "n", "steps", "guidance", "sampler", "format")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Request:
    """One checked request; ``settings`` the sampling after the bundle's defaults filled gaps."""

    label: int | None
    prompt: str | None
    seed: int
    first: int
    n: int
    settings: object                 # pipeline.Settings
    format: str

    @property
    def key(self) -> tuple:
        return group_key(self)


def group_key(request: Request) -> tuple:
    """What requests sharing a batch must agree on: the sampler, its steps and options, the
    guidance (one w per call), and prompt or label conditioning."""
    s = request.settings
    return (s.sampler, s.steps, s.guidance, tuple(sorted(s.options.items())), request.prompt is not None)


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"'{name}' must be an integer in {low}..{high}, got {value!r}")
    return value


def parse_request(body, manifest, max_n: int = 16, text: bool = False) -> Request:
    """A request's JSON body -> :class:`Request`; any fault -> one-line InvalidInput.
    ``text``: the bundle takes prompts (a text encoder)."""
    from .pipeline import resolve_labels, resolve_settings

    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    n, seed = _int(body, "n", 1, 1, max_n), _int(body, "seed", 0, 0, MAX_SEED)
    first = _int(body, "first", 0, 0, MAX_SEED)
    fmt = body.get("format", "png")
    if fmt not in FORMATS:
        raise InvalidInput(f"'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    sampler, guidance = body.get("sampler"), body.get("guidance")
    if sampler is not None and not isinstance(sampler, str):
        raise InvalidInput(f"'sampler' must be a sampler name, got {sampler!r}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or not 0 <= guidance <= 100):
        raise InvalidInput(f"'guidance' must be a number in 0..100, got {guidance!r}")
    steps = None if body.get("steps") is None else _int(body, "steps", 0, 1, 1000)
    settings = resolve_settings(manifest, sampler, steps, guidance)
    if settings.guidance != 1.0 and not manifest.guidable:
        raise InvalidInput("'guidance' needs a class-conditional model with a null label (or a prompt)")
    label, prompt = body.get("class"), body.get("prompt")
    if text:
        if label is not None or not isinstance(prompt, str):
            raise InvalidInput("this bundle draws from text: give 'prompt' (a string), not 'class'")
    else:
        if prompt is not None:
            raise InvalidInput("this bundle takes no prompt")
        if label is not None:
            resolve_labels(manifest, 1, [label])          # range and type, in one line
    if fmt == "png" and manifest.space == "latent" and "decoder" not in manifest.components:
        raise InvalidInput("this latent bundle has no decoder: ask for 'format': 'npz' (latents)")
    return Request(label, prompt, seed, first, n, settings, fmt)


class Engine:
    """An open pipeline answering batches of requests."""

    def __init__(self, pipe, max_batch: int = 64):
        self.pipe, self.max_batch = pipe, max_batch
        self.text = pipe.context_shape is not None

    def parse(self, body, max_n: int = 16) -> Request:
        return parse_request(body, self.pipe.manifest, max_n, self.text)

    def run(self, requests: list[Request]) -> list:
        """One answer per request, in order: (bytes, content type, samples in its batch), or
        the exception that its group met (the other groups are unaffected: one group's fault,
        even a bug, must not fail the requests merged beside it; :func:`failure` words it)."""
        answers: list = [None] * len(requests)
        groups: dict = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.key, []).append(i)
        for members in groups.values():
            try:
                outputs = self._draw([requests[i] for i in members])
            except Exception as exc:        # noqa: BLE001 -- answered to that group only
                if not isinstance(exc, EdgediffError):       # a bug: its traceback goes to the replica's log
                    logging.getLogger(__name__).exception("a batch group failed")
                outputs = [exc] * len(members)
            for i, out in zip(members, outputs):
                answers[i] = out
        return answers

    def _draw(self, group: list[Request]) -> list:
        """One pipeline run for requests that agree on :func:`group_key`; split per request."""
        from .pipeline import decode_images, generate, resolve_labels

        manifest, s = self.pipe.manifest, group[0].settings
        streams = [(r.seed, r.first + i) for r in group for i in range(r.n)]
        total = len(streams)
        labels = None
        if manifest.conditional:
            labels = np.concatenate([resolve_labels(manifest, r.n, None if r.label is None else [r.label],
                                                    first=r.first) for r in group])
        conditions = self._text_conditions(group, s.guidance) if group[0].prompt is not None else None
        out = generate(self.pipe.backend, manifest, total, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                       batch=min(total, self.max_batch), labels=labels, conditions=conditions, streams=streams,
                       **s.options)
        images = out.images if not out.latent or self.pipe.decoder is None else \
            decode_images(self.pipe.decoder, out.samples)
        answers, start = [], 0
        for r in group:
            rows = slice(start, start + r.n)
            start += r.n
            answers.append((_encode(r, None if images is None else images[rows],
                                    out.samples[rows] if out.latent else None,
                                    None if labels is None else labels[rows]), FORMATS[r.format], total))
        return answers

    def _text_conditions(self, group: list[Request], guidance: float):
        from .conditions import ConditionFeatures
        from .manifest import TEXT_CONTEXT

        prompts = [r.prompt for r in group for _ in range(r.n)]
        text, order = self.pipe.prompt_contexts(prompts, guided=guidance != 1.0)
        null = None if text.null is None else {TEXT_CONTEXT: text.null}
        return ConditionFeatures({TEXT_CONTEXT: text.context}, order, null)


def failure(answer) -> tuple[int, str] | None:
    """(HTTP status, one line) for an answer of :meth:`Engine.run` that is an error, else
    None: 422 for a request the bundle cannot draw, 500 for anything else (a bug, a backend
    fault), which the replica survives."""
    if isinstance(answer, EdgediffError):
        return 422, " ".join(str(answer).split())
    if isinstance(answer, Exception):
        return 500, " ".join(f"internal error ({type(answer).__name__}): {answer}".split())
    return None


def _encode(request: Request, images, latents, labels) -> bytes:
    """PNG: the image (a grid for n > 1); npz: uint8 images, float32 latents, labels."""
    from .images import png_writer

    buf = io.BytesIO()
    if request.format == "png":
        png_writer(images[0] if len(images) == 1 else grid(images))(buf)      # the files' PNG encoding
    else:
        arrays = {k: v for k, v in (("images", images), ("latents", latents), ("labels", labels)) if v is not None}
        np.savez_compressed(buf, **arrays)
    return buf.getvalue()

