"""Commands that make a new run (import-official, and any other importer): what they create inside the run
directory is removed again when they fail, are interrupted (Ctrl-C) or terminated (SIGTERM), so a failed
import leaves no `.vitfold.lock`, `import/` or half a run behind and can simply be repeated."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _entries(root: Path) -> set[Path]:
    """Every file, link and folder under `root` (links not followed)."""
    found: set[Path] = set()
    for folder, dirs, files in os.walk(root):
        found.update(Path(folder, name) for name in (*dirs, *files))
    return found


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like an exception, so the clean-up below runs


@contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM raises `SystemExit(143)` inside the block (the default would end the process on the spot,
    skipping every `finally`); the former handler is back afterwards. Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    former = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, former)


@contextmanager
def removed_on_failure(run_dir: Path) -> Iterator[None]:
    """Run the block; if it raises (a `VitfoldError`, a bug, Ctrl-C, SIGTERM), remove every file and folder it
    created in `run_dir`, deepest first, and `run_dir` itself when the block created it. What was there before
    is left alone; links are removed, never followed."""
    existed = run_dir.is_dir()
    before = _entries(run_dir) if existed else set()
    with terminated_as_exit():
        try:
            yield
        except BaseException:
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            for path in sorted(_entries(run_dir) - before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
