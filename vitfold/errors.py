"""Errors a user can cause. The CLI prints them as one line and exits non-zero; bugs keep their traceback."""


class VitfoldError(Exception):
    """Bad input: a wrong option, file, model or layer. CLI exit code 2."""

    exit_code = 2


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
