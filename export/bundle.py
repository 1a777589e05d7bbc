"""Writing a bundle: export, validate, hash, and install the directory atomically."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edgediff.runtime.bundle import MANIFEST, finalize_manifest, hash_bundle_files
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.files import check_replaceable, replace_dir, sha256_file, staged_dir, write_json_atomic
from edgediff.runtime.interrupts import deferred
from edgediff.runtime.manifest import TEXT_CONTEXT, Component, Manifest, Sampling
from edgediff.runtime.parity import ParityResult

from .companions import component_records, export_companions, feature_source, validate_pair
from .models import get_family
from .onnx_export import export_onnx, validate
from .reference import build_reference, manifest_for


class ParityError(EdgediffError, RuntimeError):
    """The exported graph does not reproduce PyTorch within the family's tolerance."""


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    parity: ParityResult
    num_params: int


def tool_versions() -> dict:
    import onnx
    import onnxruntime

    from edgediff import __version__

    return {"edgediff": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def recommended_sampling(family_name: str, spec, overrides: dict | None = None) -> Sampling:
    """What ``generate`` uses when the user names no sampler, steps or guidance: the
    official recipes' guidance (DiT's sample.py cfg-scale 4; U-ViT's ``cfg_scale`` s, which
    guides as ε_c + s·(ε_c − ε_u), i.e. w = 1 + s here; DDM's 10 sampling steps), with the
    runtime's fast default sampler for the schedule. A text-to-image U-ViT is guided without a
    label, by the empty prompt's context (its ``context`` input), so its ``cfg_scale`` is
    recorded too (MS-COCO: s = 1, w = 2). ``overrides`` (``export_bundle(sampling=...)``) win."""
    guided = spec.null_label is not None or TEXT_CONTEXT in spec.features
    base = {"dit": {"guidance": 4.0 if guided else 1.0},
            "uvit": {"guidance": 1.0 + spec.extra.get("cfg_scale", 0.0) if guided else 1.0},
            "ddm": {"steps": spec.extra.get("official_sampling_timesteps", 10)},
            "ddm_cond": {"steps": spec.extra.get("official_sampling_timesteps", 10)}}.get(family_name, {})
    return Sampling(**{**base, **(overrides or {})})


def _manifest(family, config, spec, checkpoint, opset, max_batch, sampling) -> Manifest:
    return manifest_for(
        family.name, spec, config, recommended_sampling(family.name, spec, sampling),
        max_batch=max_batch, opset=opset,
        source={"checkpoint": Path(checkpoint).name if checkpoint else None,
                "sha256": sha256_file(checkpoint) if checkpoint else None},
        tools=tool_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def export_bundle(family_name: str, config: dict, out: str | Path, checkpoint: str | Path | None = None,
                  opset: int = 21, max_batch: int | None = None, sampling: dict | None = None,
                  log=print) -> ExportResult:
    """Export ``family`` at ``config`` to a validated bundle directory at ``out``;
    ``sampling`` overrides the recommended sampling defaults recorded in the bundle."""
    out = Path(out)
    # spec() validates the config (ConfigError) without torch: a bad config fails in
    # milliseconds, before a module is built or any directory is created
    spec = get_family(family_name).spec(config)
    check_replaceable(out, MANIFEST, "a bundle")
    family, module = build_reference(family_name, config, checkpoint)
    n_params = sum(p.numel() for p in family.official(module).parameters())
    companions = family.companions(module, config) if family.companions else {}
    features = feature_source(companions)
    with staged_dir(out) as stage:
        tmp = stage.path
        log(f"exporting {family.name} ({n_params / 1e6:.1f}M parameters) to ONNX opset {opset} ...")
        export_onnx(module, spec, tmp / "model.onnx", opset=opset, max_batch=max_batch, features=features)
        log("validating ONNX Runtime against PyTorch ...")
        parity = validate(module, spec, tmp / "model.onnx", family.tolerance, features=features)
        entries, failures = {"fp32": parity.to_dict()}, [] if parity.passed else [parity.summary()]
        manifest = _manifest(family, config, spec, checkpoint, opset, max_batch, sampling).replace(
            parity={"fp32": {"passed": parity.passed, "worst_rel_l2": parity.worst_rel_l2}})
        if companions:
            manifest = _add_companions(family, module, spec, companions, tmp, manifest, entries, failures, log)
        write_json_atomic(tmp / "parity.json", entries)
        manifest = finalize_manifest(tmp, manifest)
        if failures:
            failed = stage.keep_failed()
            raise ParityError(f"{'; '.join(failures)}; the bundle was left at {failed} for inspection")
        replace_dir(tmp, out, MANIFEST, "a bundle")
    return ExportResult(out, manifest, parity, n_params)


def _add_companions(family, module, spec, companions, tmp, manifest, entries, failures, log) -> Manifest:
    """Export the family's companion graphs (the condition encoder) beside model.onnx, validate
    each and the split pair against the unsplit forward, record them in the manifest."""
    results = export_companions(companions, tmp, manifest.opset or 21, manifest.max_batch, log=log)
    log("validating the split pair (cond_encoder -> model) against the unsplit PyTorch forward ...")
    pair = validate_pair(family.official(module), spec, companions, tmp, family.tolerance)
    entries.update({f"{n}.fp32": r.to_dict() for n, r in results.items()}, **{"pair.fp32": pair.to_dict()})
    failures.extend(f"{n}: {r.summary()}" for n, r in {**results, "pair": pair}.items() if not r.passed)
    return manifest.replace(components=component_records(companions, results, pair, manifest.source))


def install_component(bundle, stage: Path, name: str, file: str, parity, io: tuple[dict, dict],
                      extra: dict) -> Manifest:
    """Install ``stage``'s ``file`` into ``bundle`` as the FP32 model of companion ``name``
    (``io``: its declared inputs and outputs), with the rung-1 ``parity`` it passed."""
    inputs, outputs = io
    component = Component(inputs=inputs, outputs=outputs, models={"fp32": file},
                          parity={"fp32": {"passed": parity.passed, "worst_rel_l2": parity.worst_rel_l2}},
                          extra=extra)
    m = bundle.manifest
    return install_into_bundle(bundle, stage, {f"{name}.fp32": parity.to_dict()},
                               m.replace(components={**m.components, name: component}))


def install_into_bundle(bundle, tmp: Path, parity_entries: dict, manifest: Manifest) -> Manifest:
    """Move the staged files of ``tmp`` into ``bundle``, merge ``parity_entries`` into
    parity.json, then write ``manifest`` with every file hashed. Everything is hashed while
    still staged, so the bundle's own files change only in a short burst of renames followed by
    the new bundle.json (atomic); a reader that lands in that burst sees bundle.json unchanged
    but a file changed, and reads again (runtime/bundle.py) rather than crying "altered".
    SIGINT/SIGTERM are held during the burst, so the bundle never keeps half an addition."""
    parity_path = bundle.path / "parity.json"
    old = json.loads(parity_path.read_text()) if parity_path.is_file() else {}
    write_json_atomic(tmp / "parity.json", {**old, **parity_entries})
    staged = hash_bundle_files(tmp)
    replaced = {f.name for f in tmp.iterdir()}
    kept = {rel: digest for rel, digest in hash_bundle_files(bundle.path).items() if rel.split("/")[0] not in replaced}
    with deferred():
        for f in sorted(tmp.iterdir()):
            f.replace(bundle.path / f.name)
        return finalize_manifest(bundle.path, manifest, files={**kept, **staged})
