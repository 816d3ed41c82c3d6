"""What every checkpoint source shares: the ``Checkpoint`` record, the ``CheckpointSource`` base
(loading, tokenizer, selection), weight-file digests and the reading of weight files."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from ckpt_analysis.config import CheckpointsSpec, selector_predicate
from ckpt_analysis.device import resolve_device
from ckpt_analysis.errors import CheckpointError, one_line
from ckpt_analysis.progress import quiet_transformers_bars
from ckpt_analysis.types import Selector

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run: its training step, a display revision and where it lives."""

    step: int
    revision: str
    ref: str
    tokens_seen: int | None = None


S = TypeVar("S", bound=CheckpointsSpec)


class CheckpointSource(ABC, Generic[S]):
    """A family of checkpoints sharing one architecture; knows how to list and load them."""

    _kinds: ClassVar[dict[str, type[CheckpointSource[Any]]]] = {}

    def __init__(self, spec: S) -> None:
        self.spec = spec

    def __init_subclass__(cls, *, kind: str, **kwargs: Any) -> None:
        """A source registers itself under its ``checkpoints.source`` value."""
        super().__init_subclass__(**kwargs)
        CheckpointSource._kinds[kind] = cls

    @classmethod
    def from_spec(cls, spec: CheckpointsSpec) -> CheckpointSource[Any]:
        """The source class for ``spec.source`` (each registers itself in its own module)."""
        return cls._kinds[spec.source](spec)

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

    def check_keys(self, ckpt: Checkpoint, layout: dict[str, tuple[int, ...]]) -> None:
        """Refuse tensor names the loader will not accept; none here (``from_pretrained`` maps its own)."""

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

        from ckpt_analysis.models.onehot import register

        register()  # the built-in one-hot model type loads like any other
        quiet_transformers_bars()
        dtype = getattr(torch, self.spec.dtype)
        if self.spec.verify_digests:
            for path in self.weight_files(ckpt):
                verify_digest(path, ckpt.revision)
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
        model.eval()
        return model

    def tokenizer(self, ckpt: Checkpoint) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        from ckpt_analysis.models.onehot import register

        register()  # AutoTokenizer reads the folder's config too
        where = self.spec.tokenizer or str(self.files_dir(ckpt))
        try:
            return AutoTokenizer.from_pretrained(where)
        except Exception as exc:
            raise CheckpointError(
                f"no tokenizer at {where!r} ({one_line(exc)}); set checkpoints.tokenizer to a tokenizer "
                "folder, or use pre-tokenized ids with data.token_text = false"
            ) from exc


def expected_digest(path: Path) -> tuple[str, str] | None:
    """``(algorithm, hex digest)`` a weight file must have, where its storage says, else None.

    A Hub cache names each blob by its content: the sha256 for LFS files (weights), the git blob
    sha1 for small files. Beside any file, a ``<name>.sha256`` sidecar (``sha256sum`` output)
    gives the digest for local runs and state dicts (docs/jobs.md, "What is checked at load time").
    """
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        return "sha256", sidecar.read_text().split()[0].lower()
    if path.is_symlink():
        blob = path.resolve().name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            return "sha256", blob
        if re.fullmatch(r"[0-9a-f]{40}", blob):
            return "git-sha1", blob
    return None


def file_digest(path: Path, algorithm: str) -> str:
    """The digest of a file's bytes (``git-sha1``: git's blob hash, as the Hub names small files)."""
    if algorithm == "git-sha1":
        hasher = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            hasher.update(block)
    return hasher.hexdigest()


_VERIFIED: set[tuple[str, int, int]] = set()
"""Files verified in this process, by (real path, size, mtime): a worker hashes each file once."""


def verify_digest(path: Path, revision: str) -> None:
    """Check a weight file against :func:`expected_digest`; raise naming the revision if it differs."""
    expected = expected_digest(path)
    if expected is None:
        return
    real = path.resolve()
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    found = file_digest(real, expected[0])
    if found != expected[1]:
        raise CheckpointError(
            f"checkpoint {revision}: {path.name} is corrupt: its {expected[0]} is {found[:16]}…, "
            f"its storage says {expected[1][:16]}…; download it again (`ckpt-analysis prefetch`)"
        )
    _VERIFIED.add(key)


def weight_files_in(folder: Path, ckpt: Checkpoint) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            return [folder / s for s in sorted(shards)]
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"checkpoint {ckpt.revision}: no weight file in {folder}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6, non-zip) torch.save files cannot be mapped
    return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))


def select(ckpts: list[Checkpoint], selector: Selector) -> list[Checkpoint]:
    """Apply a selector (docs/jobs.md): "all", "log", "every=N", "A:B", "A:B:N", or a list.

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
    keep = selector_predicate(selector)
    return [c for c in ckpts if keep(c.step)]


def _sample(ckpts: list[Checkpoint]) -> str:
    names = [c.revision for c in ckpts]
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
