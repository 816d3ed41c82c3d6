"""Checkpoint sources (Hub revisions, local runs, state-dict files), one module each, with their
shared base (``base``: loading, selection, weight-file digests) and the layout checks (``layout``)."""

from ckpt_analysis.checkpoints.base import (
    Checkpoint,
    CheckpointSource,
    expected_digest,
    file_digest,
    select,
    verify_digest,
)
from ckpt_analysis.checkpoints.hub import (
    PYTHIA_REVISIONS,
    PYTHIA_STEPS,
    PYTHIA_TOKENS_PER_STEP,
    HubSource,
    hub_cache_complete,
    is_pythia,
    prefetch,
)
from ckpt_analysis.checkpoints.layout import (
    BOOKKEEPING_KEYS,
    STANDARD_KEYS,
    check_layout,
    read_layout,
    standard_names,
)
from ckpt_analysis.checkpoints.local import LocalRunSource
from ckpt_analysis.checkpoints.state_dict import StateDictSource

__all__ = [
    "BOOKKEEPING_KEYS",
    "PYTHIA_REVISIONS",
    "PYTHIA_STEPS",
    "PYTHIA_TOKENS_PER_STEP",
    "STANDARD_KEYS",
    "Checkpoint",
    "CheckpointSource",
    "HubSource",
    "LocalRunSource",
    "StateDictSource",
    "check_layout",
    "expected_digest",
    "file_digest",
    "hub_cache_complete",
    "is_pythia",
    "prefetch",
    "read_layout",
    "select",
    "standard_names",
    "verify_digest",
]
