"""RUN/manifest.json: per stage, its settings, inputs and outputs with sha256, versions, wall time, status.

A stage is marked "running" when it starts and recorded "done" (with what it read and wrote) when it
has finished; a later stage checks the hashes of what it reads (`verified_input`) and refuses an
artifact that changed since it was recorded. `staleness` says whether, and why, a stage must run again.
`vitfold run` also records what a complete pipeline left (`record_pipeline`), so that a rerun with nothing
to do is told by `pipeline_unchanged` from this file and the hashes alone, without importing the stages
(torch, timm, ONNX): a rerun of the demo takes well under 2 s.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.pipeline.atomic import atomic_replace, atomic_write_json
from vitfold.pipeline.stages.rundir import RunDir

PACKAGES = ("vitfold", "torch", "timm", "onnx", "onnxruntime", "safetensors")


class Stale(Enum):
    """Why a stage must run (again)."""

    NEW = "new"  # never started
    INTERRUPTED = "interrupted"  # started, never recorded as done
    SETTINGS = "settings"
    INPUT = "input"
    OUTPUT = "output"
    FORCED = "forced"


@dataclass(frozen=True)
class Staleness:
    kind: Stale
    message: str

    @property
    def resumable(self) -> bool:
        """The stage never finished, so whatever it left behind (a training checkpoint) may be continued."""
        return self.kind in (Stale.NEW, Stale.INTERRUPTED)

    def __str__(self) -> str:
        return self.message


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def read_manifest(rd: RunDir) -> dict[str, Any]:
    if not rd.manifest_file.is_file():
        return {"stages": {}}
    try:
        return json.loads(rd.manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise VitfoldError(
            f"{rd.manifest_file} is not valid JSON ({e}); delete it to rebuild the run's record"
        ) from None


def read_manifest_bytes(rd: RunDir) -> bytes | None:
    """The manifest file as it is now (None: there is none), for `restore_manifest`."""
    return rd.manifest_file.read_bytes() if rd.manifest_file.is_file() else None


def restore_manifest(rd: RunDir, before: bytes | None) -> None:
    """Put the manifest back to `before` (`read_manifest_bytes`): a stage that failed on its input records
    nothing, not even that it started."""
    if before is None:
        rd.manifest_file.unlink(missing_ok=True)
    elif read_manifest_bytes(rd) != before:
        atomic_replace(rd.manifest_file, before)


def _hashes(rd: RunDir, paths: list[Path]) -> dict[str, str]:
    return {rd.key(p): rd.sha256(p) for p in paths}


def start_stage(rd: RunDir, stage: str) -> None:
    """Mark `stage` as running: killed before `record_stage`, it is never taken for finished."""
    manifest = read_manifest(rd)
    manifest["stages"].setdefault(stage, {})["status"] = "running"
    atomic_write_json(rd.manifest_file, manifest)


def record_stage(
    rd: RunDir,
    stage: str,
    params: dict[str, Any],
    inputs: list[Path],
    outputs: list[Path],
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    """Write the stage's entry (status "done", the settings it ran with) into the manifest; return it."""
    manifest = read_manifest(rd)
    entry = {
        "status": "done",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "params": params,
        "inputs": _hashes(rd, [p for p in inputs if p.is_file()]),
        "outputs": _hashes(rd, outputs),
        "versions": versions(),
        **extra,
    }
    manifest["stages"][stage] = entry
    atomic_write_json(rd.manifest_file, manifest)
    return entry


def recorded_outputs(rd: RunDir, stage: str) -> list[Path]:
    """The files `stage` recorded as its outputs (none if it has not run)."""
    entry = read_manifest(rd)["stages"].get(stage, {})
    return [rd.path / key for key in sorted(entry.get("outputs", {}))]


def verified_input(rd: RunDir, path: Path, producer: str, *, recorded_only: bool = False, hint: str = "") -> Path:
    """`path`, after checking it against the sha256 the `producer` stage recorded for it. With
    `recorded_only`, a file the producer did not record is refused too (an artifact that may run code).
    `hint` ends a refusal's message (what to do instead)."""
    if not path.is_file():
        raise VitfoldError(f"{path} not found: run the {producer} stage first")
    recorded = read_manifest(rd)["stages"].get(producer, {}).get("outputs", {})
    key = rd.key(path)
    then = f"; {hint}" if hint else ""
    if key not in recorded and recorded_only:
        raise VitfoldError(
            f"{path} was not written by this run's {producer} stage (not in its manifest): refusing it{then}"
        )
    if key in recorded and recorded[key] != rd.sha256(path):
        raise VitfoldError(
            f"{path} does not match the sha256 the {producer} stage recorded: refusing a changed file{then}"
        )
    return path


def staleness(rd: RunDir, stage: str, inputs: list[Path], params: dict[str, Any]) -> Staleness | None:
    """Why `stage` must run again (None: it is up to date): not run, interrupted, other settings, an input
    missing or changed since it ran, or an output missing or not matching the sha256 recorded for it."""
    entry = read_manifest(rd)["stages"].get(stage)
    if entry is None:
        return Staleness(Stale.NEW, "not run yet")
    if entry.get("status") != "done":
        return Staleness(Stale.INTERRUPTED, "it did not finish")
    recorded = entry.get("params")
    if recorded != params:
        changed = sorted(k for k in params.keys() | (recorded or {}).keys() if params.get(k) != (recorded or {}).get(k))
        return Staleness(Stale.SETTINGS, f"its settings changed ({', '.join(changed) or 'none recorded'})")
    current = {rd.key(p): p for p in inputs if p.is_file()}  # absent optional inputs are no inputs
    gone = sorted(entry["inputs"].keys() - current.keys())
    if gone:
        return Staleness(Stale.INPUT, f"its input {gone[0]} is missing")
    for key, path in current.items():
        if key not in entry["inputs"]:
            return Staleness(Stale.INPUT, f"its input {key} is new")
        if entry["inputs"][key] != rd.sha256(path):
            return Staleness(Stale.INPUT, f"its input {key} changed")
    for key, digest in entry["outputs"].items():
        path = rd.path / key
        if not path.is_file():
            return Staleness(Stale.OUTPUT, f"its output {key} is missing")
        if rd.sha256(path) != digest:
            return Staleness(
                Stale.OUTPUT, f"its output {key} does not match its recorded sha256 (changed or corrupted)"
            )
    return None


PIPELINE = "pipeline"  # the manifest's record of the last complete `vitfold run`


def _digest(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def record_pipeline(rd: RunDir, config_text: str, watched: dict[str, list[Path]]) -> None:
    """After `vitfold run` left every stage done: the config it ran (config.yaml's text), each stage's
    entry (by its digest: a stage run again alone changes it) and every input it watches, present or not."""
    manifest = read_manifest(rd)
    record = {
        "config": _digest(config_text),
        "vitfold": _vitfold_version(),
        "stages": {
            name: {"entry": _digest(manifest["stages"][name]), "watched": sorted({rd.key(p) for p in paths})}
            for name, paths in watched.items()
        },
    }
    if manifest.get(PIPELINE) != record:
        manifest[PIPELINE] = record
        atomic_write_json(rd.manifest_file, manifest)


def pipeline_unchanged(rd: RunDir, config_text: str) -> list[str] | None:
    """The stages of the last complete `vitfold run`, in order, when a rerun with `config_text` has nothing
    to do: the same config, every stage's entry as that run left it, every watched input and every output
    with its recorded sha256 (an absent optional input still absent). None: let `staleness` decide."""
    manifest = read_manifest(rd)
    record = manifest.get(PIPELINE)
    if not record or record["config"] != _digest(config_text) or record.get("vitfold") != _vitfold_version():
        return None
    if not rd.config_file.is_file() or rd.config_file.read_text() != config_text:
        return None
    for name, seen in record["stages"].items():
        entry = manifest["stages"].get(name)
        if entry is None or entry.get("status") != "done" or _digest(entry) != seen["entry"]:
            return None
        for key in seen["watched"]:
            path, recorded = rd.path / key, entry["inputs"].get(key)
            if (path.is_file() and recorded is None) or (recorded is not None and not _same(rd, path, recorded)):
                return None
        if not all(_same(rd, rd.path / key, digest) for key, digest in entry["outputs"].items()):
            return None
    return list(record["stages"])


def _vitfold_version() -> str:
    return metadata.version("vitfold")


def _same(rd: RunDir, path: Path, digest: str) -> bool:
    return path.is_file() and rd.sha256(path) == digest
