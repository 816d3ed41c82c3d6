"""Plain state-dict files sharing one model config: the ``state_dict`` source."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt_analysis.checkpoints.base import Checkpoint, CheckpointSource, read_state_dict
from ckpt_analysis.config import StateDictCheckpoints
from ckpt_analysis.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class StateDictSource(CheckpointSource[StateDictCheckpoints], kind="state_dict"):
    """Plain ``*.pt`` / ``*.safetensors`` state dicts sharing one model config."""

    def available(self) -> list[Checkpoint]:
        paths = sorted({Path(p) for pattern in self.spec.files for p in glob.glob(pattern)})
        if not paths:
            raise CheckpointError(f"no state-dict files match {self.spec.files}")
        ckpts = []
        for path in paths:
            numbers = re.findall(r"\d+", path.stem)
            if not numbers:
                raise CheckpointError(f"cannot read a step number from the file name {path.name}")
            step = int(numbers[-1])
            ckpts.append(Checkpoint(step, path.name, str(path), self.tokens_seen(step)))
        return sorted(ckpts, key=lambda c: c.step)

    def files_dir(self, ckpt: Checkpoint) -> Path:
        config = Path(str(self.spec.config))
        folder = config if config.is_dir() else config.parent
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"model config {config} not found")
        return folder

    def weight_files(self, ckpt: Checkpoint) -> list[Path]:
        return [Path(ckpt.ref)]

    def check_keys(self, ckpt: Checkpoint, layout: dict[str, tuple[int, ...]]) -> None:
        """The file's tensor names must be the ``model.state_dict()`` names of the config's model."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(self.files_dir(ckpt)))
        with torch.device("meta"):
            expected = set(AutoModelForCausalLM.from_config(config).state_dict())
        extra, absent = sorted(set(layout) - expected), sorted(expected - set(layout))
        if extra or absent:
            raise CheckpointError(
                f"checkpoint {ckpt.revision}: its tensor names are not the model's state_dict() names "
                f"(unexpected {extra[:3]}, missing {absent[:3]}); state-dict files must hold "
                "model.state_dict(); for save_pretrained folders use checkpoints.source = 'local'"
            )

    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(self.files_dir(ckpt)))
        config._attn_implementation = attn
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = read_state_dict(Path(ckpt.ref))
        model.load_state_dict(state, strict=True)
        return model
