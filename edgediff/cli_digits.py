"""The digits commands: ``demo``, ``evaluate`` and ``train-digits``.

Registered on the main group in ``edgediff/cli.py``::

    from edgediff.cli_digits import DIGITS_COMMANDS
    for _command in DIGITS_COMMANDS: cli.add_command(_command)

Torch is imported only inside ``train-digits`` and (for a stale bundle) ``demo``.
"""
from __future__ import annotations

import json

import click

from edgediff.export.training.digits import DIGITS_CONFIGS
from edgediff.runtime.judge import DDM_CLIPPED_GUIDANCE, DEFAULT_GUIDANCE
from edgediff.runtime.samplers import SAMPLERS

FAMILY_NAMES = tuple(DIGITS_CONFIGS)


@click.command()
@click.option("--family", type=click.Choice(FAMILY_NAMES),
              help="Which shipped digits model to run (default: dit).")
@click.option("--out", default="demo.png", show_default=True, type=click.Path(dir_okay=False), help="PNG grid.")
@click.option("--cache", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Where the exported bundle is kept (build/digits-FAMILY).")
@click.option("--guidance", type=float, help=f"Guidance scale w (default: {DEFAULT_GUIDANCE:g}; "
              f"{DDM_CLIPPED_GUIDANCE:g} for ddm).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the only noise source.")
def demo(family, out, cache, guidance, seed):
    """Export the embedded digits model, draw ten of each class on ONNX Runtime, judge them."""
    from edgediff.export.training.demo import DEFAULT_FAMILY, run_demo

    result = run_demo(family or DEFAULT_FAMILY, cache=cache, png=out, guidance=guidance, seed=seed,
                      log=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {result.png} (rows: classes 0-9) from {result.bundle}")
    click.echo(result.judge.summary())
    click.echo(f"done in {result.seconds:.1f} s")


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (default: the schedule's usual one).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000), help="Sampler steps.")
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(2), help="Samples per class.")
@click.option("--guidance", type=float, help=f"Guidance scale w (default: {DEFAULT_GUIDANCE:g}; "
              f"{DDM_CLIPPED_GUIDANCE:g} for ddm).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the only noise source.")
@click.option("--precision", default="fp32", show_default=True, help="Which model of the bundle to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def evaluate(source, sampler, steps, per_class, guidance, seed, precision, as_json):
    """Judge digits samples: a BUNDLE (sampled here on ONNX Runtime) or a samples .npz."""
    from edgediff.runtime.judge import evaluate as run

    result = run(source, per_class=per_class, sampler=sampler, steps=steps, guidance=guidance,
                 seed=seed, precision=precision)
    click.echo(json.dumps(result.to_dict()) if as_json else result.summary())


@click.command("train-digits")
@click.option("--family", required=True, type=click.Choice(FAMILY_NAMES), help="Model family.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for model.safetensors, config.json, train.json.")
@click.option("--steps", type=click.IntRange(1), help="Training steps (default: the family's budget).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of initialisation and batches.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="torch CPU threads.")
def train_digits(family, out, steps, seed, threads):
    """Train a small class-conditional model of FAMILY on scikit-learn's digits."""
    from edgediff.export.training.train import train

    result = train(family, out, steps=steps, seed=seed, threads=threads)
    click.echo(f"wrote {result.path}: final loss {result.final_loss:.4f} in {result.seconds:.0f} s")


DIGITS_COMMANDS = (demo, evaluate, train_digits)
