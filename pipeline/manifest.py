"""RUN/manifest.json: per stage, its inputs and outputs with sha256, versions, wall time and status.

A stage records itself when it has finished; a later stage checks the hashes of what it reads
(`verified_input`) and refuses an artifact that changed since it was recorded.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import VitfoldError
from pipeline.run import atomic_write_json

MANIFEST = "manifest.json"
PACKAGES = ("vitfold", "torch", "timm", "onnx", "onnxruntime", "safetensors")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VitfoldError(f"{path} is not valid JSON ({e}); delete it to rebuild the run's record") from None


def _hashes(run_dir: Path, paths: list[Path]) -> dict[str, str]:
    return {str(p.relative_to(run_dir) if p.is_relative_to(run_dir) else p): sha256(p) for p in paths}


def record_stage(
    run_dir: Path, stage: str, inputs: list[Path], outputs: list[Path], seconds: float, **extra: Any
) -> dict[str, Any]:
    """Write the stage's entry (status "done") into RUN/manifest.json and return it."""
    manifest = read_manifest(run_dir)
    pending = manifest.get("pending", {}).pop(stage, None)  # the settings `vitfold run` started it with
    entry = {
        "status": "done",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "inputs": _hashes(run_dir, inputs),
        "outputs": _hashes(run_dir, outputs),
        "versions": versions(),
        **extra,
        **({"params": pending} if pending is not None else {}),
    }
    manifest["stages"][stage] = entry
    atomic_write_json(run_dir / MANIFEST, manifest)
    return entry


def verified_input(run_dir: Path, path: Path, producer: str) -> Path:
    """`path`, after checking it against the sha256 the `producer` stage recorded for it."""
    if not path.is_file():
        raise VitfoldError(f"{path} not found: run the {producer} stage first")
    recorded = read_manifest(run_dir)["stages"].get(producer, {}).get("outputs", {})
    key = str(path.relative_to(run_dir))
    if key in recorded and recorded[key] != sha256(path):
        raise VitfoldError(f"{path} does not match the sha256 the {producer} stage recorded: refusing a changed file")
    return path


def start_stage(run_dir: Path, stage: str, params: dict[str, Any]) -> None:
    """Mark `stage` as running with `params`; `record_stage` files the params with its entry when it is
    done, so a stage killed before that is never taken for finished (a stage run on its own records none)."""
    manifest = read_manifest(run_dir)
    if stage in manifest["stages"]:
        manifest["stages"][stage]["status"] = "running"
    manifest.setdefault("pending", {})[stage] = params
    atomic_write_json(run_dir / MANIFEST, manifest)


def stale_reason(run_dir: Path, stage: str, inputs: list[Path], params: dict[str, Any]) -> str | None:
    """Why `stage` must run again (None: it is up to date): not run, other settings, an input missing or
    changed since it ran, or an output missing or not matching the sha256 recorded when it was written."""
    entry = read_manifest(run_dir)["stages"].get(stage)
    if entry is None or entry.get("status") != "done":
        return "not run yet" if entry is None else "it did not finish"
    if entry.get("params") != params:
        changed = sorted(k for k in params.keys() | (entry.get("params") or {}).keys()
                         if params.get(k) != (entry.get("params") or {}).get(k))  # fmt: skip
        return f"its settings changed ({', '.join(changed) or 'none recorded'})"
    for path in inputs:
        key = str(path.relative_to(run_dir) if path.is_relative_to(run_dir) else path)
        if not path.is_file():
            return f"its input {key} is missing"
        if entry["inputs"].get(key) != sha256(path):
            return f"its input {key} changed"
    for key, digest in entry["outputs"].items():
        path = run_dir / key
        if not path.is_file():
            return f"its output {key} is missing"
        if sha256(path) != digest:
            return f"its output {key} does not match its recorded sha256 (changed or corrupted)"
    return None
