"""Errors a user can cause. The CLI prints them as one line and exits non-zero; bugs keep their traceback."""

from typing import Any

_UNSET = object()


class VitfoldError(Exception):
    """Bad input: a wrong option, file, model or layer. CLI exit code 2.

    A library error about one argument names it: `VitfoldError("use fp32, fp16", argument="precision",
    value="fp8")` reads "precision='fp8': use fp32, fp16" from Python, and the CLI shows the flag that
    set it instead ("--precision fp8: use fp32, fp16")."""

    exit_code = 2

    def __init__(self, message: str, *, argument: str | None = None, value: Any = _UNSET) -> None:
        self.argument, self.value, self.detail = argument, value, message
        if argument is None:
            super().__init__(message)
        else:
            super().__init__(f"{argument}{'' if value is _UNSET else f'={value!r}'}: {message}")

    def as_flag(self, flags: dict[str, str]) -> str:
        """The message with the argument spelled as the CLI flag `flags` maps it to (default --argument)."""
        if self.argument is None:
            return str(self)
        flag = flags.get(self.argument, "--" + self.argument.replace("_", "-"))
        return f"{flag}{'' if self.value is _UNSET else f' {self.value}'}: {self.detail}"


class AdapterError(VitfoldError):
    """An adapter cannot be attached to, or loaded into, this model."""


class FoldError(VitfoldError):
    """The adapted model cannot be folded (for example a non-finite adapter value)."""


class BackboneError(VitfoldError):
    """The backbone cannot be created or its weights cannot be had."""


class DataError(VitfoldError):
    """A dataset cannot be read: a bad --data spec, a missing split, an empty class, a corrupt image."""


class CheckpointError(VitfoldError):
    """A checkpoint cannot be read or does not fit the backbone or the run."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__
