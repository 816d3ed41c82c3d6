"""Error types: every bad input raises one of these with a message naming the culprit."""

import re


class CkptAnalysisError(Exception):
    """Base class for errors the toolkit reports to the user as one clear message."""


class JobSpecError(CkptAnalysisError):
    """The job spec (TOML) is invalid: unknown keys, wrong types, bad values."""


class CheckpointError(CkptAnalysisError):
    """A checkpoint is missing, corrupt, non-finite, or differs in layout from the others."""


class DataError(CkptAnalysisError):
    """Evaluation data is missing, empty, too short, or longer than the model context."""


class StoreError(CkptAnalysisError):
    """The results store path is unusable or belongs to another job."""


class SubmitError(CkptAnalysisError):
    """SLURM submission failed: no ``sbatch`` on PATH, or ``sbatch`` refused a stage."""


def one_line(exc: BaseException) -> str:
    """An exception as one plain line: its first non-empty line, terminal colour codes removed."""
    text = _ANSI.sub("", str(exc))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
