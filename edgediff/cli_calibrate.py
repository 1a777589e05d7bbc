"""CLI command ``calibrate``: record INT8 calibration feeds of a bundle (calibration/feeds.py),
torch-free (registered in cli.py)."""
from __future__ import annotations

import time

import click
from tqdm.auto import tqdm

from edgediff.runtime.samplers import SAMPLERS


@click.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The feeds .npz to write.")
@click.option("--samples", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="Draws to sample (every class in turn); per prompt / condition image when given.")
@click.option("--cap", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="Rows kept per sampler step (a seeded uniform choice among the step's feeds).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the draws and the choice.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (default: the bundle's recommended one).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampler steps (default: the bundle's recommended).")
@click.option("--guidance", type=float, help="Guidance scale w (default: the bundle's recommended one).")
@click.option("--prompt", "prompts", multiple=True, help="Text-to-image bundles: a calibration prompt (repeatable).")
@click.option("--cond", "cond_path", type=click.Path(exists=True),
              help="Image-conditioned bundles: condition image(s), as for `generate --cond`.")
@click.option("--images", "images_path", type=click.Path(exists=True, dir_okay=False),
              help="Real images instead of trajectories: an .npz of 'images' (uint8 N,H,W,C or float N,C,H,W in "
                   "[-1, 1]) and 'labels' for class-conditional bundles, diffused to every sampler step (latent "
                   "bundles: through their encoder); --cap rows per step (guided: cap/2 images, each also with the "
                   "null label).")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(1, 4096), help="Samples per model batch.")
def calibrate(bundle, out, samples, cap, seed, sampler, steps, guidance, prompts, cond_path, images_path, batch):
    """Record the denoiser's inputs along sampling trajectories (timestep-aware INT8 calibration data)."""
    from edgediff.calibration.images import image_feeds
    from edgediff.runtime.errors import InvalidInput
    from edgediff.runtime.pipeline import Pipeline

    start = time.perf_counter()
    if images_path and (prompts or cond_path):
        raise InvalidInput("--images replaces sampling: it takes no --prompt or --cond")
    with Pipeline.from_bundle(bundle, max_batch=batch) as pipe:
        if images_path:
            feeds = image_feeds(pipe, images_path, cap, seed, sampler, steps, guidance, batch)
            source = f"from {feeds.meta['image_count']} images"
        else:
            feeds = _trajectory_feeds(pipe, samples, cap, seed, sampler, steps, guidance, prompts, cond_path, batch)
            source = f"({feeds.meta['sampler']}, w = {feeds.meta['guidance']:g})"
    feeds.save(out)
    click.echo(f"wrote {out}: {len(feeds)} rows over {feeds.meta['steps_recorded']} steps {source} "
               f"in {time.perf_counter() - start:.1f} s")


def _trajectory_feeds(pipe, samples, cap, seed, sampler, steps, guidance, prompts, cond_path, batch):
    from edgediff.calibration.feeds import record_feeds
    from edgediff.runtime.conditions import read_conditions
    from edgediff.runtime.pipeline import total_model_calls

    extra = {"prompt": list(prompts)} if prompts else {}
    cond = read_conditions(pipe, cond_path, None)
    extra.update({"cond": cond} if cond is not None else {})
    draws = samples * len(prompts or cond if (prompts or cond is not None) else [0])
    total = total_model_calls(pipe.manifest, draws, min(batch, draws), sampler=sampler, steps=steps, guidance=guidance)
    with tqdm(total=total, desc="calibrating", unit="call", disable=None) as bar:
        return record_feeds(pipe, samples, cap, seed, sampler, steps, guidance, batch, bar.update, **extra)


COMMANDS = (calibrate,)
