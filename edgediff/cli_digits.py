"""The digits commands: ``demo`` and ``evaluate`` at the top, and the ``digits`` group
(``train``, ``train-vae``, ``check``, ``quality-table``, ``train-judge``) for the embedded models' tooling.

Registered on the main group in ``edgediff/cli.py`` through ``DIGITS_COMMANDS``. Torch is
imported only inside the commands that train or run PyTorch, and (for a stale bundle) ``demo``.
"""
from __future__ import annotations

import json

import click

from edgediff.digits.data import CONDITIONED, DIGITS_CONFIGS, TEXT_CONDITIONED
from edgediff.digits.judge import JUDGE_PATH
from edgediff.runtime.samplers import SAMPLERS

FAMILY_NAMES = tuple(DIGITS_CONFIGS)
# the class-judged models (demo, quality table); image-conditioned ones have `digits inpaint`
JUDGED_NAMES = tuple(n for n in DIGITS_CONFIGS if n not in CONDITIONED)
# the quality table requests classes by label; text models are judged per phrasing (evaluate --phrasing)
TABLED_NAMES = tuple(n for n in JUDGED_NAMES if n not in TEXT_CONDITIONED)


@click.command()
@click.option("--family", type=click.Choice(JUDGED_NAMES),
              help="Which shipped digits model to run (default: dit; dit_latent: a latent DiT decoded by "
                   "the digits autoencoder; lucid: unconditional, v-prediction; uvit_t2i: text-to-image, "
                   "each row drawn from the prompt 'the digit K').")
@click.option("--out", default="demo.png", show_default=True, type=click.Path(dir_okay=False), help="PNG grid.")
@click.option("--cache", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Where the exported bundle is kept (build/digits-FAMILY).")
@click.option("--guidance", type=float, help="Guidance scale w (default: the bundle's recommended one).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the per-sample noise streams.")
def demo(family, out, cache, guidance, seed):
    """Export the embedded digits model, draw ten of each class (or 100 unconditional samples) on ONNX Runtime, judge them."""
    from edgediff.digits.demo import DEFAULT_FAMILY, run_demo

    result = run_demo(family or DEFAULT_FAMILY, cache=cache, png=out, guidance=guidance, seed=seed,
                      log=lambda msg: click.echo(msg, err=True))
    rows = "rows: classes 0-9" if result.judge.conditional else "unconditional: 100 samples"
    click.echo(f"wrote {result.png} ({rows}) from {result.bundle}")
    click.echo(result.judge.summary())
    click.echo(f"done in {result.seconds:.1f} s")


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (default: the bundle's recommended one).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampler steps (default: the bundle's recommended).")
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(2), help="Samples per class.")
@click.option("--guidance", type=float, help="Guidance scale w (default: the bundle's recommended one).")
@click.option("--classifier-scale", type=float, default=0.0, show_default=True,
              help="Classifier guidance scale s with the bundle's classifier (edgediff add-classifier).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the per-sample noise streams.")
@click.option("--precision", default="fp32", show_default=True, help="Which model of the bundle to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--phrasing", "phrasings", multiple=True,
              help="Text-to-image bundles: a prompt phrasing naming the digit by {word} or {digit}, judged "
                   "per digit (repeatable; default: '{word}', 'the digit {digit}', 'a handwritten {word}').")
def evaluate(source, sampler, steps, per_class, guidance, classifier_scale, seed, precision, as_json, phrasings):
    """Judge digits samples: a BUNDLE (sampled here on ONNX Runtime) or a samples .npz."""
    from edgediff.digits import text
    from edgediff.digits.judge import evaluate as run

    sampling = dict(per_class=per_class, sampler=sampler, steps=steps, guidance=guidance, seed=seed, precision=precision)
    if text.is_text_bundle(source):
        results = text.evaluate(source, phrasings or text.CHECK_PHRASINGS, **sampling)
        lines = [json.dumps({p: r.to_dict() for p, r in results.items()})] if as_json else \
            [f"{p!r}: {r.summary()}" for p, r in results.items()]
        click.echo("\n".join(lines))
        return
    if phrasings:
        raise click.UsageError("--phrasing applies to text-to-image bundles only")
    result = run(source, classifier_scale=classifier_scale, **sampling)
    click.echo(json.dumps(result.to_dict()) if as_json else result.summary())


@click.group()
def digits():
    """Tooling of the embedded digits models: training, checks, the quality table, the judge."""


@digits.command("train")
@click.option("--family", required=True, type=click.Choice(FAMILY_NAMES),
              help="Model family, or dit_latent (a DiT on the digits autoencoder's latents).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for model.safetensors, config.json, train.json.")
@click.option("--steps", type=click.IntRange(1), help="Training steps (default: the family's budget).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of initialisation and batches.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="torch CPU threads.")
@click.option("--vae", type=click.Path(exists=True, file_okay=False),
              help="Latent models: the autoencoder whose latents to learn (default: the shipped digits/assets/vae).")
def train_digits(family, out, steps, seed, threads, vae):
    """Train a small digits model of FAMILY on scikit-learn's digits (class-conditional; lucid: unconditional)."""
    from edgediff.digits.train import train

    result = train(family, out, steps=steps, seed=seed, threads=threads, vae=vae)
    click.echo(f"wrote {result.path}: final loss {result.final_loss:.4f} in {result.seconds:.0f} s")


@digits.command("train-vae")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for config.json (with scaling_factor), diffusion_pytorch_model.safetensors, train.json.")
@click.option("--steps", type=click.IntRange(1), help="Training steps (default: the shipped autoencoder's budget).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of initialisation and batches.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="torch CPU threads.")
def train_vae(out, steps, seed, threads):
    """Train the digits KL autoencoder (diffusers AutoencoderKL, 16x16x1 <-> 4x4x4) for latent models."""
    from edgediff.digits.vae import train_vae as run

    result = run(out, steps=steps, seed=seed, threads=threads)
    rec = result.reconstruction
    click.echo(f"wrote {result.path}: final loss {result.final_loss:.4f} in {result.seconds:.0f} s, "
               f"scaling_factor {result.scaling_factor:.5f}")
    click.echo(f"held-out reconstructions: judge accuracy {100 * rec.accuracy:.1f}% "
               f"(real {100 * rec.baseline_accuracy:.1f}%), FD {rec.fd:.2f}")


@digits.command("check")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (default: the bundle's recommended one).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampler steps (default: the model's recommended).")
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(2), help="Samples per class.")
@click.option("--guidance", type=float, help="Guidance scale w (default: the model's recommended one).")
@click.option("--vae", type=click.Path(exists=True, file_okay=False),
              help="Latent models: the autoencoder that decodes them (default: the one named in train.json).")
def check(path, sampler, steps, per_class, guidance, vae):
    """Judge a training output directory through PyTorch (no ONNX export); latent models are
    decoded by their autoencoder in PyTorch."""
    from edgediff.digits.quality import check as run

    click.echo(run(path, per_class, sampler, steps, guidance, vae).summary())


@digits.command("quality-table")
@click.option("--families", default=",".join(TABLED_NAMES), show_default=True,
              help="Comma-separated digits families to table.")
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(2),
              help="Samples per class for the 20-step rows.")
@click.option("--long-per-class", default=20, show_default=True, type=click.IntRange(2),
              help="Samples per class for the 20- vs 1000-step comparison.")
@click.option("--guidance", type=float, help="Guidance scale w (default: the model's recommended one).")
@click.option("--cache", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Where the exported bundles are kept (build/digits-FAMILY).")
def quality_table(families, per_class, long_per_class, guidance, cache):
    """The README's quality table of the shipped weights, sampled on ONNX Runtime (~15 min)."""
    from pathlib import Path

    from edgediff.digits.quality import table

    names = [f.strip() for f in families.split(",") if f.strip()]
    unknown = sorted(set(names) - set(TABLED_NAMES))
    if unknown:
        raise click.BadParameter(f"unknown families {unknown}; choose from {', '.join(TABLED_NAMES)}",
                                 param_hint="--families")
    click.echo("\n".join(table(names, per_class, long_per_class, guidance, Path(cache))))


@digits.command("train-classifier")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for model.safetensors, config.json, train.json (the shipped one: digits/assets/classifier).")
@click.option("--steps", type=click.IntRange(1), help="Training steps (default: the shipped classifier's 2000).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of initialisation and batches.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="torch CPU threads.")
def train_classifier(out, steps, seed, threads):
    """Train the noisy-image digits classifier (ADM EncoderUNetModel) for classifier guidance."""
    from edgediff.digits.classifier import train_classifier as run

    record = run(out, steps=steps, seed=seed, threads=threads)
    click.echo(f"wrote {out}: final loss {record['final_loss']:.4f} in {record['seconds']:.0f} s; held-out accuracy "
               f"by noise step {record['held_out_accuracy_by_step']}")
    click.echo(f"add it to a digits bundle: edgediff add-classifier BUNDLE --checkpoint {out}/model.safetensors "
               f"--config {out}/config.json")


@digits.command("train-judge")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help=f"Where to write the judge's weights (.npz); the shipped judge is {JUDGE_PATH.name} in digits/assets.")
@click.option("--epochs", default=150, show_default=True, type=click.IntRange(1), help="Training epochs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of initialisation and batches.")
def train_judge(out, epochs, seed):
    """Train the torch-free digits judge (a small MLP) on the train split."""
    from edgediff.digits.judge_train import train_and_save

    result = train_and_save(out, epochs, seed)
    click.echo(f"wrote {out}; held-out accuracy {100 * result.accuracy:.2f}%, FD {result.fd:.3f}")


@digits.command("inpaint")
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--limit", type=click.IntRange(2), help="Only the first N held-out conditions (default: all 359).")
@click.option("--per-condition", default=1, show_default=True, type=click.IntRange(1), help="Samples per condition.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (default: the bundle's recommended one).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampler steps (default: the bundle's recommended).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the per-sample noise streams.")
@click.option("--out", type=click.Path(dir_okay=False), help="PNG grid: each condition beside its samples.")
@click.option("--cache", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Where the shipped model's bundle is kept (build/digits-ddm_cond), without BUNDLE.")
def inpaint(bundle, limit, per_condition, sampler, steps, seed, out, cache):
    """Inpaint held-out digits (a random 6x6 square blanked) with the image-conditioned model
    (BUNDLE, default: the shipped ddm_cond weights) and judge the share drawn as the right digit."""
    from pathlib import Path

    from edgediff.digits.demo import ensure_bundle
    from edgediff.digits.inpaint import judge_pipeline
    from edgediff.runtime.images import check_outputs, save_outputs
    from edgediff.runtime.pipeline import Pipeline

    path = bundle or ensure_bundle("ddm_cond", Path(cache) / "digits-ddm_cond", log=lambda m: click.echo(m, err=True))
    with Pipeline.from_bundle(path, max_batch=120) as pipe:
        check_outputs(path, pipe.manifest, pipe.decoder is not None, png=out)
        result, gen = judge_pipeline(pipe, per_condition, seed=seed, steps=steps, sampler=sampler, limit=limit)
        lines = save_outputs(pipe.manifest, gen, png=out) if out else []
    click.echo(result.summary())
    for line in lines:
        click.echo(line)


DIGITS_COMMANDS = (demo, evaluate, digits)
