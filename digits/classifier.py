"""A noisy-image digits classifier for classifier guidance, in ADM's ``EncoderUNetModel`` layout.

Trained as guided-diffusion's ``classifier_train.py`` trains its ImageNet classifiers (noised
inputs): a step n drawn uniformly from the 1000 steps of the digits models' linear schedule,
x_n = sqrt(abar_n)·x0 + sqrt(1 - abar_n)·eps, cross-entropy on the label. So it estimates
p(y | x_n, n), whose input gradient classifier guidance adds to a sampler's step. It is not the
judge (``judge.py``): the judge is a separate MLP trained on clean digits only, so guidance is
scored by a classifier it was not steered by.

Written like ``train.py``'s models (AdamW, warm-up + cosine, EMA weights saved), into a
directory with ``model.safetensors`` (the official EncoderUNetModel key layout, what
``edgediff add-classifier --checkpoint`` takes), ``config.json`` (its constructor keyword
arguments, ``--config``) and ``train.json``.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgediff.export.models import adm, adm_classifier
from edgediff.runtime.files import check_replaceable

from . import data as digits
from .objectives import DiscreteSchedule
from .train import TRAIN_RECORD, Hyper, optimise, save

# 16x16 -> 8x8 -> 4x4, attention at 4x4 and in the pool; 559k parameters (2.2 MB FP32).
CONFIG = dict(adm_classifier.SCHEMA.defaults(), image_size=digits.SIZE, in_channels=1, model_channels=32,
              out_channels=digits.NUM_CLASSES, num_res_blocks=1, attention_resolutions=[4], channel_mult=[1, 2, 2],
              num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, pool="attention")
HYPER = Hyper(steps=2000, batch=64, lr=1e-3, warmup=100, weight_decay=0.05, label_dropout=0.0)
SCHEDULE = adm.SCHEDULES["linear"]          # the digits denoisers' schedule (DiT's and ADM's)


class _Official:
    """``save`` stores ``family.official(module)``: here the classifier itself."""

    @staticmethod
    def official(module):
        return module


def accuracy(module, x0: np.ndarray, y: np.ndarray, steps=(0, 250, 500, 750), seed: int = 0) -> dict[int, float]:
    """Accuracy on noised held-out digits at a few steps n (the same noise for every model)."""
    sched = DiscreteSchedule(SCHEDULE)
    gen = torch.Generator().manual_seed(seed)
    x0, y = torch.from_numpy(x0), torch.from_numpy(y)
    out = {}
    with torch.no_grad():
        for n in steps:
            eps = torch.randn(x0.shape, generator=gen)
            x_n = sched.sqrt_abar[n] * x0 + sched.sqrt_1m_abar[n] * eps
            logits = module(x_n, torch.full((len(y),), float(n)))
            out[n] = round(float((logits.argmax(1) == y).float().mean()), 4)
    return out


def train_classifier(out: str | Path | None, *, steps: int | None = None, seed: int = 0, threads: int | None = 1,
                     progress: bool = True) -> dict:
    """Train the digits classifier and write ``out``; returns the training record."""
    if out is not None:
        check_replaceable(Path(out), TRAIN_RECORD, "a digits training output")
    if threads:
        torch.set_num_threads(threads)
    h = Hyper(**{**asdict(HYPER), **({"steps": steps} if steps else {})})
    torch.manual_seed(seed)
    module = adm_classifier.build(CONFIG).train()
    data = digits.load()
    sched = DiscreteSchedule(SCHEDULE)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)

    def step_loss(step):
        idx = torch.randint(0, len(train_y), (h.batch,), generator=gen)
        x_n, n, _ = sched.noised(train_x[idx], gen)
        logits = module(x_n, n.to(torch.float32))                        # (B, 10)
        return torch.nn.functional.cross_entropy(logits, train_y[idx])

    model, curve, _, run, seconds = optimise(module, h, step_loss, "train digits classifier", progress)
    record = {"model": "adm EncoderUNetModel (noisy-image classifier)", "seed": seed, "steps": h.steps,
              "final_loss": float(run[0]), "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "hyper": asdict(h), "loss_curve": curve, "schedule": SCHEDULE,
              "parameters": sum(p.numel() for p in model.parameters()),
              "held_out_accuracy_by_step": accuracy(model, data.held_x, data.held_y),
              "data": {"train": "sklearn load_digits, 80% per-class split (seed 0), 8x8 -> 16x16 bilinear, [-1, 1], "
                                "noised at a uniform step of the linear 1000-step schedule"}}
    if out is not None:
        save(out, _Official, model, CONFIG, record)
    return record
