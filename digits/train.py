"""Train a small class-conditional denoiser of any family on the digits.

AdamW with a short warm-up and cosine decay, gradient clipping, an EMA of the weights
(what gets saved), and labels replaced by the null label 10% of the time so the model
also learns the unconditional prediction that classifier-free guidance needs. Seeded:
the same seed and thread count give the same weights.

The output directory holds, written atomically (a temporary directory renamed into place):
``model.safetensors`` (the EMA weights in the family's official layout, as
``FAMILY.official(module).state_dict()``), ``config.json`` (the official constructor
keyword arguments, what ``edgediff export --config`` takes) and ``train.json`` (steps,
final loss, seconds, seed, hyperparameters, a coarse loss curve).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edgediff.export.models import get_family
from edgediff.runtime.files import check_replaceable, public_mode, replace_dir, staged_dir

from . import data as digits
from .inpaint import FILL, HOLE, mask_batch
from .objectives import objective_for
from edgediff.runtime.errors import InvalidInput


TRAIN_RECORD = "train.json"     # marks a directory as a training output (safe to replace)


@dataclass
class Hyper:
    steps: int
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    grad_clip: float = 1.0


# Step budgets sized so each family trains in under ten minutes on 2 (shared) CPU cores:
# a U-Net step costs 2-4 times a transformer step at these sizes.
TRAINING: dict[str, Hyper] = {
    "ddpm": Hyper(steps=2800, batch=64, lr=2e-3),
    "uvit": Hyper(steps=5000, batch=64, lr=2e-3),
    "dit": Hyper(steps=5000, batch=64, lr=2e-3),
    "ddm": Hyper(steps=2000, batch=64, lr=2e-3),
    "dit_latent": Hyper(steps=5000, batch=64, lr=2e-3),
    "lucid": Hyper(steps=1800, batch=64, lr=2e-3),
    "ddm_cond": Hyper(steps=1200, batch=64, lr=2e-3, label_dropout=0.0),
    "uvit_t2i": Hyper(steps=5000, batch=64, lr=2e-3),     # label_dropout: the empty prompt's share
}


@dataclass
class TrainResult:
    path: Path | None
    final_loss: float
    seconds: float
    curve: list = field(default_factory=list)      # [step, smoothed loss] at 20 points
    losses: list = field(default_factory=list)     # every step's loss


def _dit_init(model: nn.Module) -> None:
    """DiT's own initialisation: Xavier linears, N(0, 0.02) label/time embeddings, and the
    adaLN-Zero modulations and output layer at zero, so every block starts as identity."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        nn.init.normal_(lin.weight, std=0.02)
    for block in [*model.blocks, model.final_layer]:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def build_model(family_name: str, config: dict, seed: int):
    """(family, export-view module in train mode, spec), initialised from ``seed``;
    ``family_name`` is a model family or a digits model name (``dit_latent``)."""
    family_name = digits.model_family(family_name)
    family = get_family(family_name)
    torch.manual_seed(seed)
    module = family.build(config)
    if family_name == "dit":
        _dit_init(family.official(module))
    spec = family.spec(config)
    if spec.conditional and spec.null_label is None:
        raise InvalidInput(f"the {family_name} digits config needs a null label for guidance")
    return family, module.train(), spec


class Ema:
    """Exponential moving average of the parameters, warmed up (short runs move fast)."""

    def __init__(self, module: nn.Module, decay: float):
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1.0 - d)
        # buffers (BatchNorm running statistics: ddm_cond's relation layers) are the live
        # model's; left at their initial values, the saved model would normalise wrongly
        for s, b in zip(self.shadow.buffers(), module.buffers()):
            s.copy_(b)


def _lr(h: Hyper, step: int) -> float:
    if step < h.warmup:
        return h.lr * (step + 1) / h.warmup
    progress = (step - h.warmup) / max(1, h.steps - h.warmup)
    return h.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))   # cosine to 10%


def _batch(data: digits.Digits, h: Hyper, null: int, gen: torch.Generator):
    idx = torch.randint(0, len(data.train_y), (h.batch,), generator=gen)
    x0 = torch.from_numpy(data.train_x)[idx]                                # (B, 1, 16, 16)
    y = torch.from_numpy(data.train_y)[idx]                                 # (B,)
    if null is None:                                                        # unconditional (lucid)
        return x0, y
    drop = torch.rand(h.batch, generator=gen) < h.label_dropout
    return x0, torch.where(drop, torch.full_like(y, null), y)


def optimise(module: nn.Module, h, step_loss, desc: str, progress: bool = True):
    """AdamW with warm-up + cosine learning rate, gradient clipping and an EMA of the weights.
    ``step_loss(step)`` returns the loss, or (loss, *parts) whose running means the curve also
    records. Returns (EMA module, curve, losses, running means, seconds)."""
    opt = torch.optim.AdamW(module.parameters(), lr=h.lr, weight_decay=getattr(h, "weight_decay", 0.0))
    ema = Ema(module, h.ema_decay)
    start, curve, losses, run = time.perf_counter(), [], [], None
    bar = tqdm(range(h.steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(h, step)
        out = step_loss(step)
        loss, *parts = out if isinstance(out, tuple) else (out,)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), h.grad_clip)
        opt.step()
        ema.update(module, step)
        now = np.array([loss.item(), *(p.item() for p in parts)])
        losses.append(float(now[0]))
        run = now if run is None else 0.98 * run + 0.02 * now
        if (step + 1) % max(1, h.steps // 20) == 0 or step + 1 == h.steps:
            curve.append([step + 1, *(round(float(v), 5) for v in run)])
            bar.set_postfix(loss=f"{run[0]:.4f}")
    return ema.shadow, curve, losses, run, time.perf_counter() - start


def fit(family_name: str, config: dict, h: Hyper, seed: int = 0, data: digits.Digits | None = None,
        progress: bool = True, text=None):
    """Train; returns (EMA module, family, TrainResult without a path). ``text``: a text
    model's prompt contexts (:class:`.text.PromptContexts`), which take the labels' place."""
    family, module, spec = build_model(family_name, config, seed)
    data = data or training_data(family_name)
    loss_fn = objective_for(family.name, spec)
    gen = torch.Generator().manual_seed(seed)
    conditioned = family_name in digits.CONDITIONED
    # an image-conditioned model trains through its unsplit forward(x, t, cond)
    net = family.official(module) if conditioned else module

    def step_loss(step):
        x0, y = _batch(data, h, spec.null_label, gen)
        if conditioned:
            y = mask_batch(x0, gen)                  # the condition takes the labels' place
        elif text is not None:
            y = text.draw(y, gen, h.label_dropout)   # (B, L, D): a phrasing of each digit, or ""
        return loss_fn(net, x0, y, gen)

    model, curve, losses, run, seconds = optimise(module, h, step_loss, f"train {family_name}", progress)
    return model, family, TrainResult(None, float(run[0]), seconds, curve, losses)


def training_data(name: str, vae_dir: str | Path | None = None) -> digits.Digits:
    """What digits model ``name`` learns: the digits, or for a latent model the digits encoded
    once by its autoencoder (``vae_dir``, default the shipped one) into scaled latents."""
    if name not in digits.AUTOENCODER:
        return digits.load()
    from .vae import latent_digits

    return latent_digits(vae_dir or autoencoder_dir(name))


def autoencoder_dir(name: str) -> Path:
    """The shipped autoencoder of the latent digits model ``name``."""
    from .demo import ASSETS

    return ASSETS / digits.AUTOENCODER[name]


def save(out: str | Path, family, module: nn.Module, config: dict, record: dict, more=None) -> Path:
    """Write model.safetensors + config.json + train.json into ``out`` atomically;
    ``more(directory)`` writes any other files of the output (a text model's encoder)."""
    from safetensors.torch import save_file

    out = Path(out)
    with staged_dir(out) as stage:
        tmp = stage.path
        state = {k: v.detach().contiguous().clone() for k, v in family.official(module).state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        public_mode(tmp / "model.safetensors")          # the writer makes it owner-only
        for name, obj in (("config.json", config), ("train.json", record)):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if more is not None:
            more(tmp)
        replace_dir(tmp, out, TRAIN_RECORD, "a digits training output")
    return out


def train(family_name: str, out: str | Path | None, *, steps: int | None = None, seed: int = 0,
          threads: int | None = 2, config: dict | None = None, progress: bool = True,
          vae: str | Path | None = None, **overrides) -> TrainResult:
    """Train the digits model ``family_name`` (a family, or ``dit_latent``) with its digits
    config and write ``out``; a latent model learns the latents of ``vae`` (default: the
    shipped autoencoder)."""
    if family_name not in digits.DIGITS_CONFIGS:
        raise InvalidInput(f"no digits config for family {family_name!r}; choose from {', '.join(digits.DIGITS_CONFIGS)}")
    if out is not None:
        check_replaceable(Path(out), TRAIN_RECORD, "a digits training output")
    if threads:
        torch.set_num_threads(threads)
    config = dict(config or digits.DIGITS_CONFIGS[family_name])
    h = Hyper(**{**asdict(TRAINING[family_name]), **overrides, **({"steps": steps} if steps else {})})
    latent = family_name in digits.AUTOENCODER
    if vae is not None and not latent:
        raise InvalidInput(f"{family_name} is a pixel-space model: it takes no autoencoder")
    vae_dir = Path(vae or autoencoder_dir(family_name)) if latent else None
    data = training_data(family_name, vae_dir)
    text, more = None, None
    if family_name in digits.TEXT_CONDITIONED:
        from . import text as digits_text

        encoder, tokenizer, text_config = digits_text.frozen_text_encoder(seed)
        text = digits_text.PromptContexts(encoder, tokenizer)
        more = lambda d: digits_text.save_text_encoder(d, encoder, text_config)   # noqa: E731
    module, family, result = fit(family_name, config, h, seed, data=data, progress=progress, text=text)
    record = {"family": family_name, "seed": seed, "steps": h.steps, "final_loss": result.final_loss,
              "seconds": round(result.seconds, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "hyper": asdict(h), "loss_curve": result.curve,
              "data": {"train": "sklearn load_digits, 80% per-class split (seed 0), 8x8 -> 16x16 bilinear, [-1, 1]"}}
    if family_name in digits.CONDITIONED:
        record["data"]["condition"] = (f"the digit with a random {HOLE}x{HOLE} square set to {FILL} "
                                       "(digits/inpaint.py), drawn per batch")
    if text is not None:
        record["data"]["prompts"] = (f"one of {len(digits_text.PHRASINGS)} phrasings of the label per sample "
                                     f"({', '.join(digits_text.PHRASINGS)}), the empty prompt "
                                     f"{h.label_dropout:.0%} of the time; a frozen random-init CLIP text encoder")
    if latent:
        from .vae import autoencoder_record

        record["model_family"] = family.name
        record["data"]["latents"] = ("posterior means of the autoencoder times its scaling_factor "
                                     "(4x4x4, about unit variance), encoded once before training")
        record["vae"] = autoencoder_record(vae_dir, autoencoder_dir(family_name))
    if out is not None:
        result.path = save(out, family, module, config, record, more)
    return result
