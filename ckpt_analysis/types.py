"""Type aliases and small records the pipeline shares; a leaf that imports nothing from it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch

Site = Literal["resid_pre", "attn_out", "mlp_out", "resid_post"]
"""An activation site of a decoder layer (docs/covariance.md, "Sites")."""

Positions = Literal["scored", "predicting", "all"]
"""Which token positions an activation statistic covers (docs/covariance.md)."""

ExecutorKind = Literal["local", "inprocess", "slurm"]
"""``compute.executor``: a Dask LocalCluster, this process, or Dask workers as SLURM jobs."""

Selector = str | list[int] | list[str]
"""Checkpoint selector: "all", "log", "every=N", "A:B", "A:B:N", or an explicit list (docs/jobs.md)."""

Columns = dict[str, tuple[tuple[str, ...], np.ndarray]]
"""Named store columns the planner writes once (coordinates, tables): name → (dims, values)."""


class Batch(NamedTuple):
    """Sequences of a token set as tensors on one device (``EvalData.batches``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_mask: torch.Tensor
