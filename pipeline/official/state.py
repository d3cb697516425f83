"""An official checkpoint's tensors by name, taken one by one as they are mapped; what is left is an error."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitfold.errors import CheckpointError


@dataclass(frozen=True)
class OfficialImport:
    """An official checkpoint in vitfold's terms: the adapter (and head) tensors under vitfold's names, the
    backbone tensors under timm's names ({} when the checkpoint holds none), and the options of the vitfold
    method that compute the official function."""

    method: str
    adapter: dict[str, torch.Tensor]
    backbone: dict[str, torch.Tensor]
    options: dict[str, Any]
    num_classes: int
    depth: int
    notes: tuple[str, ...] = ()  # what the import chose or dropped, for the user to read


class OfficialState:
    """The tensors of an official checkpoint `path` for `method`; `take` consumes one by its official name."""

    def __init__(self, tensors: dict[str, Any], path: str | Path, method: str) -> None:
        self.path, self.method = Path(path), method
        self._left = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        if not self._left:
            raise CheckpointError(f"{self.path} holds no tensors: not an official {method} checkpoint")

    def has(self, key: str) -> bool:
        return key in self._left

    def names(self) -> list[str]:
        """The names not taken yet."""
        return list(self._left)

    def take(self, key: str) -> torch.Tensor:
        """The tensor `key`, removed from what is left; a `CheckpointError` naming it when it is absent."""
        try:
            return self._left.pop(key)
        except KeyError:
            raise CheckpointError(
                f"{self.path} lacks '{key}', which an official {self.method} checkpoint has"
            ) from None

    def take_matching(self, pattern: str) -> dict[str, torch.Tensor]:
        """Every tensor whose whole name matches the regular expression `pattern`, removed."""
        found = {k: v for k, v in self._left.items() if re.fullmatch(pattern, k)}
        for key in found:
            del self._left[key]
        return found

    def count(self, pattern: str) -> int:
        """1 + the largest integer that group 1 of `pattern` matches in a name (0 when none matches)."""
        found = [int(m.group(1)) for k in self._left if (m := re.match(pattern, k))]
        return max(found) + 1 if found else 0

    def finish(self) -> None:
        """Every tensor was mapped; else a `CheckpointError` naming the first one left."""
        if self._left:
            left = sorted(self._left)
            raise CheckpointError(
                f"{self.path}: '{left[0]}' is not part of an official {self.method} checkpoint "
                f"({len(left)} tensor(s) not mapped)"
            )


def check_imported(imported: OfficialImport, path: str | Path) -> OfficialImport:
    """`imported`, once every tensor it carries (adapter, head and backbone) is floating point and finite;
    else a `CheckpointError` naming the first that is not (the fold would refuse it much later)."""
    for name, tensor in {**imported.adapter, **imported.backbone}.items():
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor '{name}' is {tensor.dtype}, not floating point: refusing to import it"
            )
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CheckpointError(
                f"{path}: tensor '{name}' has {bad} non-finite value(s) (NaN or inf): refusing to import it"
            )
    return imported
