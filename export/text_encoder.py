"""The text-encoder companion of text-to-image bundles: ``text_encoder.onnx``
(input_ids int64 (B, L) -> last_hidden_state float32 (B, L, D)) plus the CLIP tokenizer files
in ``tokenizer/``, so the torch-free runtime can turn a prompt into the denoiser's ``context``.

U-ViT's t2i models read CLIP ViT-L/14's text tower through transformers (``FrozenCLIPEmbedder``:
``CLIPTextModel(...).last_hidden_state`` of 77 padded ids); the checkpoint here is in that
layout (``text_model.embeddings.token_embedding.weight`` ...; a whole ``CLIPModel`` file is
accepted and its vision tower ignored) and transformers' module is the PyTorch reference.
Rung 1 holds ORT to it on CLIP-shaped id rows (start, random words, end, end-padding).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from edgediff.runtime.bundle import read_bundle
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.files import sha256_file, staged_dir
from edgediff.runtime.manifest import TEXT_CONTEXT
from edgediff.runtime.parity import ParityResult
from edgediff.runtime.tokenizer import BOS, EOS, FILES, ClipTokenizer

from .models.common import read_checkpoint
from .onnx_export import export_graph, gate
from .reference import TorchBackend

NAME, FILE, TOKENIZER_DIR = "text_encoder", "text_encoder.onnx", "tokenizer"
TOLERANCE = (1e-5, 1e-4)            # rung 1, as for the denoisers


class LastHiddenState(torch.nn.Module):
    """CLIPTextModel as a one-output graph: ids (B, L) -> last_hidden_state (B, L, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return (self.model(input_ids=input_ids).last_hidden_state,)   # (B, L, D)


def build(config: dict):
    """A transformers CLIPTextModel at ``config`` (CLIPTextConfig keywords), eager attention."""
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        cfg = CLIPTextConfig(**config)
    except Exception as exc:   # noqa: BLE001 -- huggingface_hub's strict dataclasses raise their own types
        raise InvalidInput(f"not a CLIPTextConfig: {' '.join(str(exc).split())}") from None
    cfg._attn_implementation = "eager"      # plain matmuls trace the same on every torch
    return CLIPTextModel(cfg).eval()


def load(config: dict, checkpoint) -> LastHiddenState:
    model = build(config)
    state = official_to_module(read_checkpoint(checkpoint), model)
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise InvalidInput(f"{Path(checkpoint).name} is not a CLIPTextModel at this config: "
                           f"{len(missing)} missing key(s) (e.g. {missing[:2]}), "
                           f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidInput(f"{Path(checkpoint).name}: {str(exc).splitlines()[-1].strip()}") from None
    return LastHiddenState(model).eval()


def official_to_module(state: dict, model) -> dict:
    """The checkpoint's text-tower tensors under the module's key names. Published files say
    ``text_model.embeddings...`` (a CLIPModel file also holds ``vision_model.*`` and the
    projections, ignored); transformers 5's CLIPTextModel drops that prefix from its own keys."""
    prefix = "text_model."
    if any(k.startswith(prefix) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
        if not any(k.startswith(prefix) for k in model.state_dict()):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer old files kept


def component_io(length: int, dim: int) -> tuple[dict, dict]:
    return ({"input_ids": {"dtype": "int64", "shape": ["batch", length]}},
            {"last_hidden_state": {"dtype": "float32", "shape": ["batch", length, dim]}})


def id_feed(batch: int, length: int, vocab_size: int, rng: np.random.Generator) -> dict:
    """Rows like the tokenizer's: BOS, 0..L-2 random word ids, EOS, then EOS padding.
    BOS/EOS are the vocabulary's last two ids, as in CLIP."""
    bos, eos = vocab_size - 2, vocab_size - 1
    ids = np.full((batch, length), eos, np.int64)
    for row in ids:
        n = int(rng.integers(0, length - 1))
        row[0] = bos
        row[1:1 + n] = rng.integers(0, vocab_size - 2, n)
    return {"input_ids": ids}                                      # (B, L)


def validate(module, length: int, dim: int, vocab_size: int, path: Path, seed: int = 0) -> ParityResult:
    from edgediff.runtime.backends.ort import OrtBackend

    inputs, outputs = component_io(length, dim)
    rng = np.random.default_rng(seed)
    cases = [(f"batch={b} draw={d}", id_feed(b, length, vocab_size, rng)) for b in (1, 3) for d in range(2)]
    with OrtBackend(path, inputs, list(outputs)) as backend:
        return gate(TorchBackend(module, inputs, list(outputs)), backend, cases,
                    {"last_hidden_state": (length, dim)}, TOLERANCE, "onnx-fp32 (onnxruntime CPU)")


def check_fits(config: dict, manifest, tokenizer: Path | None) -> tuple[int, int]:
    """(L, D) of the bundle's ``context`` input, which the encoder must produce."""
    if TEXT_CONTEXT not in manifest.inputs:
        raise InvalidInput(f"this bundle's denoiser takes no {TEXT_CONTEXT!r} input: not a text-to-image model")
    length, dim = manifest.inputs[TEXT_CONTEXT]["shape"][1:]
    hidden, positions = config.get("hidden_size", 512), config.get("max_position_embeddings", 77)
    if hidden != dim:
        raise InvalidInput(f"the text encoder gives {hidden}-wide states, the model's context is {dim} wide")
    if positions < length:
        raise InvalidInput(f"the text encoder has {positions} positions, the model reads {length} tokens")
    if tokenizer is not None:
        vocab_size = config.get("vocab_size", 49408)
        tok = ClipTokenizer.from_dir(tokenizer, length)
        if tok.vocab_size > vocab_size or tok.id(EOS) >= vocab_size or tok.id(BOS) >= vocab_size:
            raise InvalidInput(f"the tokenizer's {tok.vocab_size} tokens do not fit the encoder's "
                               f"vocab_size {vocab_size}")
    return length, dim


def add_text_encoder(bundle_dir, checkpoint, config: dict, tokenizer=None, log=print) -> ParityResult:
    """Add ``text_encoder.onnx`` (validated, rung 1) and the tokenizer files to a t2i bundle;
    the bundle changes only if the graph passes."""
    from .bundle import ParityError, install_component

    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    if not isinstance(config, dict):
        raise InvalidInput("the text-encoder config must be a JSON object of CLIPTextConfig keywords")
    if NAME in m.components:
        raise InvalidInput(f"{bundle.path} already has a text encoder: export the bundle again to change it")
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    length, dim = check_fits(config, m, tokenizer)
    module = load(config, checkpoint)
    vocab_size = module.model.config.vocab_size
    log(f"text encoder: CLIPTextModel, {sum(p.numel() for p in module.parameters()) / 1e6:.3g}M parameters, "
        f"{length} tokens -> {dim}-wide states")
    opset = m.opset or 21
    with staged_dir(bundle.path, NAME) as stage:
        log(f"exporting it to ONNX opset {opset} and validating it against PyTorch ...")
        example = {"input_ids": torch.from_numpy(id_feed(2, length, vocab_size, np.random.default_rng(0))["input_ids"])}
        export_graph(module, example, ["last_hidden_state"], stage.path / FILE, opset=opset, max_batch=m.max_batch)
        parity = validate(module, length, dim, vocab_size, stage.path / FILE)
        if not parity.passed:
            failed = stage.keep_failed(".text_encoder.failed")
            raise ParityError(f"text encoder: {parity.summary()}; the graph was left in {failed} for inspection")
        extra = {"config": dict(config), "max_length": length,
                 "source": {"checkpoint": Path(checkpoint).name, "sha256": sha256_file(checkpoint)}}
        if tokenizer is not None:
            (stage.path / TOKENIZER_DIR).mkdir()
            for f in (*FILES, "source.json"):
                if (tokenizer / f).is_file():
                    shutil.copyfile(tokenizer / f, stage.path / TOKENIZER_DIR / f)
            extra["tokenizer"] = TOKENIZER_DIR
        install_component(bundle, stage.path, NAME, FILE, parity, component_io(length, dim), extra)
    return parity


def component_module(component, weights: Path) -> torch.nn.Module:
    """The PyTorch reference rebuilt from the bundle record and ``weights`` (FP16 gate)."""
    return load(component.extra["config"], weights)
