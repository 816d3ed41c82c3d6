"""Error types: every bad input raises one of these with a message naming the culprit."""


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
