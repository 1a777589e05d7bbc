"""CLI command for the text-encoder companion of text-to-image bundles: ``add-text-encoder``
(registered in cli.py). torch and transformers load only inside the command."""
from __future__ import annotations

import time

import click

from edgediff.runtime.files import read_json


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("add-text-encoder")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text-encoder weights in transformers' CLIPTextModel layout (text_model.*): .safetensors, "
                   "or a .pt state dict (read with weights_only=True); a whole CLIPModel file also works.")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON of CLIPTextConfig keywords (a CLIPTextModel's config.json; openai/clip-vit-large-patch14's "
                   "text_config for U-ViT's MS-COCO models).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="Directory with CLIP's vocab.json and merges.txt (scripts/fetch_clip_vocab.py writes them), "
                   "stored in the bundle so that `generate --prompt` can tokenize.")
def add_text_encoder_command(bundle, checkpoint, config_path, tokenizer):
    """Add a CLIP text encoder (text_encoder.onnx, ids -> context) to a text-to-image bundle."""
    from edgediff.export.text_encoder import add_text_encoder

    start = time.perf_counter()
    parity = add_text_encoder(bundle, checkpoint, read_json(config_path), tokenizer=tokenizer, log=_log)
    click.echo(f"text encoder: {parity.summary()}")
    click.echo(f"added the text encoder to {bundle} in {time.perf_counter() - start:.1f} s")


COMMANDS = (add_text_encoder_command,)
