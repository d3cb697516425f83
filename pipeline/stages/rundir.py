"""A run directory: every file of a run named once, its config read once, file hashes cached.

RUN/config.yaml  RUN/manifest.json  RUN/train/  RUN/compare/  RUN/fold/  RUN/export/  RUN/verify/
RUN/bench/  RUN/REPORT.md  (RUN/import/: the backbone an official checkpoint carried)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from vitfold.errors import VitfoldError
from vitfold.export import FILES, file_sha256
from vitfold.pipeline.atomic import atomic_write_text
from vitfold.pipeline.config import RunConfig, load_config

CONFIG, MANIFEST, LOCK = "config.yaml", "manifest.json", ".vitfold.lock"


sha256 = file_sha256  # a run's files are hashed as any artifact is


def _lock_holder(path: Path) -> str:
    """' (pid N)' for the process holding the flock on `path`, from /proc/locks; '' when unknown."""
    try:
        inode = f":{path.stat().st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(inode):
                return f" (pid {fields[4]})"
    except OSError:
        pass
    return ""


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None when `path` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    return missing


class RunDir:
    """The files of the run at `path`. Reading `config` fails with one line when there is no config.yaml."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_file = self.path / CONFIG
        self.manifest_file = self.path / MANIFEST
        train = self.path / "train"
        self.adapter = train / "adapter.safetensors"  # adapter + head of the best evaluated epoch
        self.adapter_last = train / "adapter_last.safetensors"
        self.metrics = train / "metrics.csv"
        self.last_ckpt = train / "last.ckpt"
        self.tensorboard = train / "tensorboard"
        self.imported_backbone = self.path / "import" / "backbone.safetensors"  # vitfold import-official
        self.compare_dir = self.path / "compare"
        self.compare_summary = self.compare_dir / "compare.json"
        self.folded = self.path / "fold" / "model.safetensors"
        self.folded_config = self.path / "fold" / "config.json"  # timm's: local-dir:RUN/fold
        self.export_dir = self.path / "export"
        self.export_summary = self.export_dir / "export.json"
        self.verify_dir = self.path / "verify"
        self.bench_dir = self.path / "bench"
        self.report = self.path / "REPORT.md"
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}
        self._lock_depth = 0  # nested `locked()` of this object (one flock per process and run)

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the run's exclusive lock: one writing vitfold process per run directory. The kernel drops
        it when the process dies, so a killed run never leaves it held. On taking it, temporary files a
        killed process left behind are removed (no other writer can own them)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        created = _first_missing(self.path)  # the folder this call makes (None: the run existed)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError as e:
            raise VitfoldError(
                f"{self.path} is read-only for you ({e.strerror}: {e.filename}): nothing can be written into it; "
                "verify a read-only run with --output DIR"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(self.path / LOCK)
            os.close(fd)
            raise VitfoldError(
                f"{self.path} is in use by another vitfold process{holder}: wait for it to finish"
            ) from None
        self._lock_depth = 1
        try:
            self._remove_leftovers()
            yield self
        except BaseException:
            if created is not None:
                self._remove_if_untouched(created)
            raise
        finally:
            self._lock_depth = 0
            os.close(fd)  # releases the lock

    def _remove_if_untouched(self, created: Path) -> None:
        """After a failed call that created the run's folder (and `created`, its first new ancestor): remove
        them again when nothing but the lock and empty folders was written, so that a refused
        `vitfold train --out NEW` leaves no run behind. A run that wrote anything (a checkpoint to resume
        from) is kept."""
        written = [p for p in self.path.rglob("*") if not p.is_dir() and p.name != LOCK]
        if not written:
            shutil.rmtree(created, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Remove what writes cut short left: `.*.tmp` files (atomic writes) anywhere in the run and
        `export/.export-*` folders (exports). The sweep never leaves the run: a symbolic link inside it
        (a linked `export/`, a linked subfolder) is not followed; at most the link itself is a leftover."""
        for folder, _, files in os.walk(self.path):  # followlinks=False: linked folders are not entered
            for name in files:  # a linked file is listed here too: unlink removes the link, not its target
                if name.startswith(".") and name.endswith(".tmp"):
                    Path(folder, name).unlink(missing_ok=True)
        if self.export_dir.is_dir() and not self.export_dir.is_symlink():
            for staging in self.export_dir.glob(".export-*"):  # exports cut short
                if staging.is_symlink():
                    staging.unlink(missing_ok=True)
                else:
                    shutil.rmtree(staging, ignore_errors=True)

    def artifact(self, fmt: str) -> Path:
        """The file export format `fmt` writes (a key of `vitfold.export.FILES`)."""
        return self.export_dir / FILES[fmt]

    def key(self, path: Path) -> str:
        """How the manifest names `path`: relative to the run when inside it, else as given."""
        return str(path.relative_to(self.path) if path.is_relative_to(self.path) else path)

    @cached_property
    def config(self) -> RunConfig:
        if not self.config_file.is_file():
            raise VitfoldError(f"{self.path} is not a run directory: {self.config_file} not found")
        return load_config(self.config_file)

    def use_config(self, cfg: RunConfig) -> None:
        """Use `cfg` as the run's config from now on, without saving it yet (`save_config` does, once the
        stage that resolves it has found its backbone, data and options)."""
        self.__dict__["config"] = cfg

    def save_config(self) -> None:
        """Save the config in use as the run's config.yaml (rewritten only when it changes)."""
        text = self.config.to_yaml()
        if not self.config_file.is_file() or self.config_file.read_text() != text:
            atomic_write_text(self.config_file, text)

    def write_config(self, cfg: RunConfig) -> None:
        """Save `cfg` as the run's config.yaml (rewritten only when it changes) and use it from now on."""
        self.use_config(cfg)
        self.save_config()

    def sha256(self, path: Path) -> str:
        """The file's sha256, computed once per (size, mtime) in the life of this object."""
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        cached = self._hashes.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, sha256(path))
            self._hashes[path] = cached
        return cached[1]

    def metadata(self, path: Path) -> dict[str, Any]:
        """The string metadata of a safetensors file (its header only; nothing is hashed or loaded)."""
        from safetensors import safe_open

        if not path.is_file():
            raise VitfoldError(f"{path} not found")
        try:
            with safe_open(path, "pt") as f:
                return dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001 - any unreadable header is an input error naming the file
            raise VitfoldError(f"cannot read {path} as safetensors: {e}") from None

    def tensors(self, path: Path) -> dict[str, Any]:
        """The tensors of a safetensors file of the run; a one-line error naming it if it is not one."""
        from safetensors.torch import load_file

        self.metadata(path)  # a missing or corrupt file fails here, by name
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001
            raise VitfoldError(f"cannot read {path} as safetensors: {e}") from None

    @property
    def num_classes(self) -> int:
        """The head size the run trained (the adapter file's metadata)."""
        return int(self.metadata(self.adapter)["num_classes"])

    def image_size(self) -> tuple[int, int]:
        """The model's input size, as the fold stage recorded it in fold/model.safetensors."""
        size = json.loads(self.metadata(self.folded).get("image_size", "null"))
        if not size:
            raise VitfoldError(
                f"{self.folded} records no image_size (written by an older vitfold): vitfold run --force fold"
            )
        return int(size[0]), int(size[1])
