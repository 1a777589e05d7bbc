"""CLI command for the classifier-guidance companion: ``add-classifier`` (registered in cli.py).
torch loads only inside the command."""
from __future__ import annotations

import time

import click

from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.files import read_json

NAMED = ["64x64", "128x128", "256x256", "512x512", "tiny"]    # export.models.adm_classifier.CONFIGS, torch-free


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _config(config_path: str | None, size: str | None) -> dict:
    if (config_path is None) == (size is None):
        raise InvalidInput("give exactly one of --config FILE or --size NAME")
    if size is not None:
        from edgediff.export.models.adm_classifier import CONFIGS

        return dict(CONFIGS[size])
    return read_json(config_path)


@click.command("add-classifier")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Classifier weights in guided-diffusion's EncoderUNetModel layout: .safetensors, or a .pt "
                   "state dict (read with weights_only=True), e.g. 256x256_classifier.pt.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON object of the EncoderUNetModel(...) keyword arguments.")
@click.option("--size", type=click.Choice(NAMED),
              help="A published classifier's arguments instead of --config (script_util.create_classifier).")
def add_classifier_command(bundle, checkpoint, config_path, size):
    """Add a noisy-image classifier's input gradient (classifier_grad.onnx) for classifier guidance."""
    from edgediff.export.classifier import add_classifier

    start = time.perf_counter()
    parity = add_classifier(bundle, checkpoint, _config(config_path, size), log=_log)
    click.echo(f"classifier: {parity.summary()}")
    click.echo(f"added the classifier to {bundle} in {time.perf_counter() - start:.1f} s")


COMMANDS = (add_classifier_command,)
