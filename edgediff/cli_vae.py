"""CLI command for autoencoder companions: ``add-vae`` (registered in cli.py; ``export --vae``
reuses :func:`add_vae_to_bundle`). torch and diffusers load only inside the command."""
from __future__ import annotations

import time

import click

LAYOUTS = ["diffusers", "ldm"]      # edgediff.export.vae_layouts.LAYOUTS, without importing torch


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def add_vae_to_bundle(bundle: str, checkpoint: str, config: str | None = None, layout: str | None = None,
                      prefix: str | None = None, scaling_factor: float | None = None) -> None:
    """Add decoder.onnx + encoder.onnx to a latent bundle and print their rung-1 results."""
    from edgediff.export.vae import add_vae

    results = add_vae(bundle, checkpoint, config=config, layout=layout, prefix=prefix,
                      scaling_factor=scaling_factor, log=_log)
    for name, parity in results.items():
        click.echo(f"{name}: {parity.summary()}")


@click.command("add-vae")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="Autoencoder weights: a diffusers folder (config.json + diffusion_pytorch_model.safetensors), "
                   "or a .safetensors/.pth/.ckpt file (read with weights_only=True).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON config: diffusers' config.json, or an LDM first-stage config with ddconfig and embed_dim.")
@click.option("--layout", type=click.Choice(LAYOUTS),
              help="Checkpoint layout (default: detected from the config's or the checkpoint's keys).")
@click.option("--prefix", help="Key prefix of the autoencoder inside the checkpoint, e.g. 'first_stage_model.' "
                               "(default: detected).")
@click.option("--scaling-factor", type=click.FloatRange(0, min_open=True),
              help="Latent scale (default: the config's, the checkpoint's scale_factor, the bundle's, else 0.18215).")
def add_vae_command(bundle, checkpoint, config_path, layout, prefix, scaling_factor):
    """Add an autoencoder (decoder.onnx, encoder.onnx) to a latent bundle, checked against PyTorch."""
    start = time.perf_counter()
    add_vae_to_bundle(bundle, checkpoint, config_path, layout, prefix, scaling_factor)
    click.echo(f"added the autoencoder to {bundle} in {time.perf_counter() - start:.1f} s")


COMMANDS = (add_vae_command,)
