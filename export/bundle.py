"""Writing a bundle: export, validate, hash, and install the directory atomically."""
from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from edgediff.runtime.bundle import (MANIFEST, check_replaceable, finalize_manifest, io_spec, public_mode,
                                     replace_dir, sha256_file, write_json_atomic)
from edgediff.runtime.parity import ParityResult

from .models import get_family
from .models.common import load_strict, read_checkpoint
from .onnx_export import export_onnx, validate


class ParityError(RuntimeError):
    """The exported graph does not reproduce PyTorch within the family's tolerance."""


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    parity: ParityResult
    num_params: int


def tool_versions() -> dict:
    import onnx
    import onnxruntime

    from edgediff import __version__

    return {"edgediff": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def build_reference(family_name: str, config: dict, checkpoint: str | Path | None = None):
    """The PyTorch export view of a family, with the checkpoint loaded strictly if given."""
    family = get_family(family_name)
    module = family.build(config)
    if checkpoint is not None:
        load_strict(family.official(module), read_checkpoint(checkpoint), label=family.name)
    return family, module.eval()


def _manifest(family, config, spec, checkpoint, opset, max_batch) -> dict:
    inputs, outputs = io_spec(spec.inputs, spec.outputs, spec.sample_shape)
    return {
        "family": family.name, "config": config, "inputs": inputs, "outputs": outputs,
        "prediction": spec.prediction, "time": spec.time, "schedule": spec.schedule,
        "sample_shape": list(spec.sample_shape), "num_classes": spec.num_classes,
        "null_label": spec.null_label, "space": spec.space, "extra": spec.extra,
        "max_batch": max_batch, "opset": opset, "models": {"fp32": "model.onnx"},
        "source": {"checkpoint": Path(checkpoint).name if checkpoint else None,
                   "sha256": sha256_file(checkpoint) if checkpoint else None},
        "tools": tool_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def export_bundle(family_name: str, config: dict, out: str | Path, checkpoint: str | Path | None = None,
                  opset: int = 21, max_batch: int | None = None, log=print) -> ExportResult:
    """Export ``family`` at ``config`` to a validated bundle directory at ``out``."""
    out = Path(out)
    # spec() validates the config (ConfigError) without torch: a bad config fails in
    # milliseconds, before a module is built or any directory is created
    spec = get_family(family_name).spec(config)
    check_replaceable(out, MANIFEST, "a bundle")
    family, module = build_reference(family_name, config, checkpoint)
    n_params = sum(p.numel() for p in module.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    public_mode(tmp, directory=True)
    try:
        log(f"exporting {family.name} ({n_params / 1e6:.1f}M parameters) to ONNX opset {opset} ...")
        export_onnx(module, spec, tmp / "model.onnx", opset=opset, max_batch=max_batch)
        log("validating ONNX Runtime against PyTorch ...")
        parity = validate(module, spec, tmp / "model.onnx", family.tolerance)
        write_json_atomic(tmp / "parity.json", {"fp32": parity.to_dict()})
        manifest = _manifest(family, config, spec, checkpoint, opset, max_batch)
        manifest["parity"] = {"fp32": {"passed": parity.passed, "worst_rel_l2": parity.worst_rel_l2}}
        manifest = finalize_manifest(tmp, manifest)
        if not parity.passed:
            failed = out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            tmp.rename(failed)
            raise ParityError(f"{parity.summary()}; the bundle was left at {failed} for inspection")
        replace_dir(tmp, out, MANIFEST, "a bundle")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, manifest, parity, n_params)
