"""Checkpoint sources (Hub revisions, local runs, state-dict files), selection, layout checks, loading."""

from __future__ import annotations

import glob
import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckpt_analysis.config import CheckpointsSpec, Selector
from ckpt_analysis.errors import CheckpointError, JobSpecError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PYTHIA_TOKENS_PER_STEP = 2_097_152
# SPEC §3: step0, step1, step2, step4, ..., step512, then step1000 ... step143000 every 1000.
PYTHIA_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
PYTHIA_REVISIONS: tuple[str, ...] = tuple(f"step{s}" for s in PYTHIA_STEPS)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run: its training step, a display revision and where it lives."""

    step: int
    revision: str
    ref: str
    tokens_seen: int | None = None


class CheckpointSource(ABC):
    """A family of checkpoints sharing one architecture; knows how to list and load them."""

    def __init__(self, spec: CheckpointsSpec) -> None:
        self.spec = spec

    @classmethod
    def from_spec(cls, spec: CheckpointsSpec) -> CheckpointSource:
        """The source class for ``spec.source``."""
        kinds: dict[str, type[CheckpointSource]] = {
            "hub": HubSource,
            "local": LocalRunSource,
            "state_dict": StateDictSource,
        }
        return kinds[spec.source](spec)

    @abstractmethod
    def available(self) -> list[Checkpoint]:
        """Every checkpoint the source names, in step order, before selection."""

    @abstractmethod
    def files_dir(self, ckpt: Checkpoint) -> Path:
        """A local folder holding the checkpoint's config (raises CheckpointError if absent)."""

    @abstractmethod
    def weight_files(self, ckpt: Checkpoint) -> list[Path]:
        """The checkpoint's weight files on local disk."""

    @abstractmethod
    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        """Load the model for ``ckpt`` (no finiteness check; see :meth:`load`)."""

    def checkpoints(self) -> list[Checkpoint]:
        """The selected checkpoints, in step order."""
        return select(self.available(), self.spec.select)

    def tokens_seen(self, step: int) -> int | None:
        return None if self.spec.tokens_per_step is None else step * self.spec.tokens_per_step

    def config(self, ckpt: Checkpoint) -> dict[str, Any]:
        path = self.files_dir(ckpt) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt.revision}: no config.json in {path.parent}")
        return dict(json.loads(path.read_text()))

    def load(self, ckpt: Checkpoint, *, attn: Literal["sdpa", "eager"] | str = "sdpa") -> PreTrainedModel:
        """Load ``ckpt`` in eval mode on the spec's dtype/device; reject NaN/inf weights."""
        import torch
        from transformers.utils import logging as hf_logging

        from ckpt_analysis.onehot import register

        register()  # the built-in one-hot model type loads like any other
        hf_logging.disable_progress_bar()  # one bar per load is noise inside a sweep
        dtype = getattr(torch, self.spec.dtype)
        try:
            model = self._load(ckpt, dtype, attn)
        except CheckpointError:
            raise
        except Exception as exc:  # transformers/safetensors raise many types for bad files
            raise CheckpointError(f"checkpoint {ckpt.revision} ({ckpt.ref}) failed to load: {exc}") from exc
        for name, param in model.named_parameters():
            if not torch.isfinite(param).all():
                raise CheckpointError(f"checkpoint {ckpt.revision}: parameter {name!r} has NaN/inf values")
        torch.nn.Module.to(model, resolve_device(self.spec.device))  # transformers mis-types .to
        return model.eval()

    def tokenizer(self, ckpt: Checkpoint) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        from ckpt_analysis.onehot import register

        register()  # AutoTokenizer reads the folder's config too
        where = self.spec.tokenizer or str(self.files_dir(ckpt))
        try:
            return AutoTokenizer.from_pretrained(where)
        except Exception as exc:
            raise CheckpointError(
                f"no tokenizer at {where!r}; set checkpoints.tokenizer to a tokenizer folder"
            ) from exc


class HubSource(CheckpointSource):
    """Revisions of a Hugging Face Hub repo, loaded through ``from_pretrained`` and a cache dir."""

    def available(self) -> list[Checkpoint]:
        if self.spec.repo is None:
            raise JobSpecError("checkpoints.repo is required when checkpoints.source = 'hub'")
        revs = self.spec.revisions
        names = list(PYTHIA_REVISIONS) if revs == "pythia" else revs
        if not isinstance(names, list):
            raise JobSpecError("checkpoints.revisions must be 'pythia' or a list of revision names")
        ckpts = [self._checkpoint(str(name), i) for i, name in enumerate(names)]
        return sorted(ckpts, key=lambda c: c.step)

    def _checkpoint(self, revision: str, index: int) -> Checkpoint:
        match = re.fullmatch(r"step(\d+)", revision)
        step = int(match.group(1)) if match else index
        per_step = self.spec.tokens_per_step
        if per_step is None and self.spec.revisions == "pythia":
            per_step = PYTHIA_TOKENS_PER_STEP
        seen = None if per_step is None else step * per_step
        return Checkpoint(step=step, revision=revision, ref=revision, tokens_seen=seen)

    def files_dir(self, ckpt: Checkpoint) -> Path:
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(
                    str(self.spec.repo),
                    revision=ckpt.revision,
                    cache_dir=self.spec.cache_dir,
                    local_files_only=True,
                )
            )
        except Exception as exc:
            raise CheckpointError(
                f"revision {ckpt.revision!r} of {self.spec.repo} is not in the cache "
                f"{self.spec.cache_dir or '(default HF cache)'}; run `ckpt-analysis prefetch` online"
            ) from exc

    def weight_files(self, ckpt: Checkpoint) -> list[Path]:
        return _weight_files_in(self.files_dir(ckpt), ckpt)

    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        self.files_dir(ckpt)  # clear error for a missing revision before transformers' own
        return AutoModelForCausalLM.from_pretrained(
            str(self.spec.repo),
            revision=ckpt.revision,
            cache_dir=self.spec.cache_dir,
            dtype=dtype,
            attn_implementation=attn,
        )


class LocalRunSource(CheckpointSource):
    """A run folder of ``save_pretrained`` checkpoints: ``checkpoint-<N>/``, ``step_<N>/`` or a pattern."""

    def available(self) -> list[Checkpoint]:
        if self.spec.path is None:
            raise JobSpecError("checkpoints.path is required when checkpoints.source = 'local'")
        root = Path(self.spec.path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder {root} does not exist")
        patterns = [self.spec.pattern] if self.spec.pattern else ["checkpoint-{step}", "step_{step}"]
        found: dict[int, Path] = {}
        for pattern in patterns:
            if "{step}" not in pattern:
                raise JobSpecError(f"checkpoints.pattern {pattern!r} must contain '{{step}}'")
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
        return _weight_files_in(self.files_dir(ckpt), ckpt)

    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(ckpt.ref, dtype=dtype, attn_implementation=attn)


class StateDictSource(CheckpointSource):
    """Plain ``*.pt`` / ``*.safetensors`` state dicts sharing one model config."""

    def available(self) -> list[Checkpoint]:
        if not self.spec.files or self.spec.config is None:
            raise JobSpecError("checkpoints.files and checkpoints.config are required for 'state_dict'")
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

    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(self.files_dir(ckpt)))
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = _read_state_dict(Path(ckpt.ref))
        model.load_state_dict(state, strict=True)
        return model


def _weight_files_in(folder: Path, ckpt: Checkpoint) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            return [folder / s for s in sorted(shards)]
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"checkpoint {ckpt.revision}: no weight file in {folder}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def read_layout(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes from weight-file headers, without reading the weights."""
    from safetensors import safe_open

    layout: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                        layout[key] = tuple(handle.get_slice(key).get_shape())
            else:
                layout.update({k: tuple(v.shape) for k, v in _read_state_dict(path).items()})
        except Exception as exc:
            raise CheckpointError(f"weights file {path} is corrupt or unreadable: {exc}") from exc
    return layout


def check_layout(source: CheckpointSource, ckpts: list[Checkpoint]) -> dict[str, Any]:
    """Check every checkpoint shares the first one's architecture and parameter layout.

    Returns the first checkpoint's config. Raises CheckpointError naming the first mismatch.
    """
    if not ckpts:
        raise CheckpointError("the checkpoint selection is empty")
    ref_ckpt = ckpts[0]
    ref_config = source.config(ref_ckpt)
    ref_layout = read_layout(source.weight_files(ref_ckpt))
    for ckpt in ckpts[1:]:
        config = source.config(ckpt)
        for key in _ARCH_KEYS:
            if config.get(key) != ref_config.get(key):
                raise CheckpointError(
                    f"architecture mismatch: checkpoint {ckpt.revision} has {key}={config.get(key)!r}, "
                    f"{ref_ckpt.revision} has {ref_config.get(key)!r}"
                )
        layout = read_layout(source.weight_files(ckpt))
        if layout != ref_layout:
            diff = sorted(set(layout.items()) ^ set(ref_layout.items()))[0]
            raise CheckpointError(
                f"parameter layout mismatch: checkpoint {ckpt.revision} differs from "
                f"{ref_ckpt.revision} at {diff[0]!r}"
            )
    return ref_config


def select(ckpts: list[Checkpoint], selector: Selector) -> list[Checkpoint]:
    """Apply a selector (SPEC §3): "all", "log", "every=N", "A:B", "A:B:N", or a list.

    A list may hold steps (ints) or revision names; an entry that names no checkpoint is an error.
    """
    if isinstance(selector, list):
        by_step = {c.step: c for c in ckpts}
        by_rev = {c.revision: c for c in ckpts}
        chosen = []
        for item in selector:
            ckpt = by_step.get(item) if isinstance(item, int) else by_rev.get(item)
            if ckpt is None:
                raise CheckpointError(f"checkpoint {item!r} is not among the available {_sample(ckpts)}")
            chosen.append(ckpt)
        return sorted(set(chosen), key=lambda c: c.step)
    keep = _selector_predicate(selector)
    return [c for c in ckpts if keep(c.step)]


def _selector_predicate(selector: str) -> Any:
    if selector == "all":
        return lambda s: True
    if selector == "log":
        return lambda s: s == 0 or (s & (s - 1)) == 0
    if match := re.fullmatch(r"every=(\d+)", selector):
        n = int(match.group(1))
        return lambda s: s % n == 0
    if match := re.fullmatch(r"(\d+):(\d+)(?::(\d+))?", selector):
        lo, hi, stride = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
        return lambda s: lo <= s <= hi and (s - lo) % stride == 0
    raise JobSpecError(
        f"checkpoint selector {selector!r} is not valid; "
        "use 'all', 'log', 'every=N', 'A:B', 'A:B:N' or a list"
    )


def _sample(ckpts: list[Checkpoint]) -> str:
    names = [c.revision for c in ckpts]
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device = 'cuda' was asked for but CUDA is not available")
    return device


def prefetch(spec: CheckpointsSpec, *, offline: bool) -> tuple[list[str], list[str]]:
    """Download (or, offline, only look up) every selected revision; returns (cached, missing)."""
    from huggingface_hub import snapshot_download

    source = CheckpointSource.from_spec(spec)
    if not isinstance(source, HubSource):
        raise JobSpecError("prefetch applies to checkpoints.source = 'hub' only")
    cached, missing = [], []
    for ckpt in source.checkpoints():
        try:
            snapshot_download(
                str(spec.repo),
                revision=ckpt.revision,
                cache_dir=spec.cache_dir,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
            )
            cached.append(ckpt.revision)
        except Exception as exc:
            log.debug("revision %s unavailable: %s", ckpt.revision, exc)
            missing.append(ckpt.revision)
    return cached, missing
