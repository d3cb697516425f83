"""Which artifacts may run code here. Loading a `.pt2` (AOTInductor `dlopen`s the shared library inside),
a `.plan` (TensorRT plugins) or a `.pt` (TorchScript) executes what the file holds, and a sha256 in the
run's own manifest proves nothing when the run directory came from elsewhere. So the export stage notes
the sha256 of every such artifact it writes in a store outside any run directory
($VITFOLD_CACHE/trusted/, default ~/.cache/vitfold/trusted/), and one not found there is loaded only
when the user says `--trust`.
"""

from __future__ import annotations

import os
from pathlib import Path

from vitfold.errors import VitfoldError


def cache_root() -> Path:
    """vitfold's cache on this machine: $VITFOLD_CACHE, default ~/.cache/vitfold."""
    return Path(os.environ.get("VITFOLD_CACHE", Path.home() / ".cache" / "vitfold"))


def _marker(digest: str) -> Path:
    return cache_root() / "trusted" / digest


def remember(digest: str) -> None:
    """Note that this machine's vitfold wrote an artifact with this sha256."""
    marker = _marker(digest)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def require_trusted(path: Path, digest: str, trust: bool) -> None:
    """Refuse to load an executable artifact that vitfold did not write here, unless `trust`."""
    if trust or _marker(digest).is_file():
        return
    raise VitfoldError(
        f"{path} runs native code when loaded and was not exported by vitfold on this machine "
        f"(sha256 {digest[:16]}… is not in {_marker(digest).parent}): pass --trust if you trust its source"
    )
