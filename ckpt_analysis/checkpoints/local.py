"""A local run folder of ``save_pretrained`` checkpoints: the ``local`` source."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt_analysis.checkpoints.base import Checkpoint, CheckpointSource, weight_files_in
from ckpt_analysis.config import LocalCheckpoints
from ckpt_analysis.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class LocalRunSource(CheckpointSource[LocalCheckpoints], kind="local"):
    """A run folder of ``save_pretrained`` checkpoints: ``checkpoint-<N>/``, ``step_<N>/`` or a pattern."""

    def available(self) -> list[Checkpoint]:
        root = Path(self.spec.path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder {root} does not exist")
        patterns = [self.spec.pattern] if self.spec.pattern else ["checkpoint-{step}", "step_{step}"]
        found: dict[int, Path] = {}
        for pattern in patterns:
            regex = re.compile(re.escape(pattern).replace(re.escape("{step}"), r"(\d+)") + "$")
            for child in root.iterdir():
                match = regex.match(child.name)
                if match and child.is_dir():
                    found.setdefault(int(match.group(1)), child)
        if not found:
            raise CheckpointError(f"no checkpoints matching {' or '.join(patterns)} in {root}")
        return [
            Checkpoint(step=s, revision=found[s].name, ref=str(found[s]), tokens_seen=self.tokens_seen(s))
            for s in sorted(found)
        ]

    def files_dir(self, ckpt: Checkpoint) -> Path:
        path = Path(ckpt.ref)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {path} does not exist")
        return path

    def weight_files(self, ckpt: Checkpoint) -> list[Path]:
        return weight_files_in(self.files_dir(ckpt), ckpt)

    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(ckpt.ref, dtype=dtype, attn_implementation=attn)
