"""Checkpoint sources (Hub revisions, local runs, state-dict files), selection, layout checks, loading."""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import itertools
import json
import logging
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckpt_analysis.config import CheckpointsSpec, hf_cache_dir, selector_predicate
from ckpt_analysis.device import resolve_device
from ckpt_analysis.errors import CheckpointError, CkptAnalysisError, JobSpecError, one_line
from ckpt_analysis.progress import quiet_transformers_bars
from ckpt_analysis.types import Selector

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PYTHIA_TOKENS_PER_STEP = 2_097_152


def is_pythia(repo: str | None) -> bool:
    """Whether ``repo`` is one of the Pythia suite's (``EleutherAI/pythia-*``), all trained on
    batches of 1024 × 2048 tokens."""
    return repo is not None and repo.lower().startswith("eleutherai/pythia-")


# docs/jobs.md: step0, step1, step2, step4, ..., step512, then step1000 ... step143000 every 1000.
PYTHIA_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
PYTHIA_REVISIONS: tuple[str, ...] = tuple(f"step{s}" for s in PYTHIA_STEPS)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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

    def check_keys(self, ckpt: Checkpoint, layout: dict[str, tuple[int, ...]]) -> None:  # noqa: B027
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
        return model.eval()

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


class HubSource(CheckpointSource):
    """Revisions of a Hugging Face Hub repo, loaded through ``from_pretrained`` and a cache dir."""

    def available(self) -> list[Checkpoint]:
        if self.spec.repo is None:
            raise JobSpecError("checkpoints.repo is required when checkpoints.source = 'hub'")
        revs = self.spec.revisions
        names = list(PYTHIA_REVISIONS) if revs == "pythia" else revs
        if not isinstance(names, list):
            raise JobSpecError("checkpoints.revisions must be 'pythia' or a list of revision names")
        unknown = sorted(set(self.spec.steps) - {str(n) for n in names})
        if unknown:
            raise JobSpecError(
                f"checkpoints.steps names {unknown}, which checkpoints.revisions does not list"
            )
        ckpts = [self._checkpoint(str(name)) for name in names]
        return _unique_steps(sorted(ckpts, key=lambda c: c.step))

    def _checkpoint(self, revision: str) -> Checkpoint:
        step = self._step(revision)
        per_step = self.spec.tokens_per_step
        if per_step is None and (self.spec.revisions == "pythia" or is_pythia(self.spec.repo)):
            per_step = PYTHIA_TOKENS_PER_STEP
        seen = None if per_step is None else step * per_step
        return Checkpoint(step=step, revision=revision, ref=revision, tokens_seen=seen)

    def _step(self, revision: str) -> int:
        """The training step of a revision (docs/jobs.md, "Revisions and steps").

        ``checkpoints.steps`` first; then a ``stepN`` name; then a branch or commit resolved in
        the cache to the ``stepN`` revision at the same commit. Anything else is refused.
        """
        if revision in self.spec.steps:
            return self.spec.steps[revision]
        if match := re.fullmatch(r"step(\d+)", revision):
            return int(match.group(1))
        refs = self._refs()
        commit = refs.get(revision, revision)
        same = sorted(r for r, c in refs.items() if c == commit and re.fullmatch(r"step\d+", r))
        if same:
            log.info("revision %s is commit %s, the same as %s", revision, commit[:12], same[0])
            return int(same[0][4:])
        raise CheckpointError(
            f"revision {revision!r} names no training step: it is not 'stepN' and no cached stepN "
            f"revision points at its commit; map it with checkpoints.steps = {{ {revision} = N }}"
        )

    def _refs(self) -> dict[str, str]:
        """Revision name → commit, from the cache's ``refs/`` folder (as the Hub writes it)."""
        folder = _repo_cache(self.spec) / "refs"
        if not folder.is_dir():
            return {}
        return {str(p.relative_to(folder)): p.read_text().strip() for p in folder.rglob("*") if p.is_file()}

    def files_dir(self, ckpt: Checkpoint) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

        try:
            return Path(
                snapshot_download(
                    str(self.spec.repo),
                    revision=ckpt.revision,
                    cache_dir=self.spec.cache_dir,
                    local_files_only=True,
                )
            )
        except (LocalEntryNotFoundError, RevisionNotFoundError) as exc:
            raise CheckpointError(
                f"revision {ckpt.revision!r} of {self.spec.repo} is not in the cache "
                f"{self.spec.cache_dir or '(default HF cache)'} ({one_line(exc)}); "
                "run `ckpt-analysis prefetch` online"
            ) from exc
        except Exception as exc:  # a cache that is there but unreadable: say why, not "missing"
            raise CheckpointError(
                f"revision {ckpt.revision!r} of {self.spec.repo} could not be read from the cache "
                f"{self.spec.cache_dir or '(default HF cache)'}: {one_line(exc)}"
            ) from exc

    def weight_files(self, ckpt: Checkpoint) -> list[Path]:
        folder = self.files_dir(ckpt)
        try:
            return _weight_files_in(folder, ckpt)
        except CheckpointError:
            _refuse_interrupted(folder, ckpt, _repo_cache(self.spec) / "blobs")
            raise

    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        self.weight_files(ckpt)  # clear error for a missing revision before transformers' own
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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = _read_state_dict(Path(ckpt.ref))
        model.load_state_dict(state, strict=True)
        return model


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


def _unique_steps(ckpts: list[Checkpoint]) -> list[Checkpoint]:
    """Refuse two checkpoints at one step, naming both (e.g. ``main`` beside the ``stepN`` it is)."""
    for a, b in itertools.pairwise(ckpts):
        if a.step == b.step:
            raise CheckpointError(
                f"checkpoints {a.revision!r} and {b.revision!r} are both step {a.step}; "
                "list one of them, or map steps with checkpoints.steps"
            )
    return ckpts


def _refuse_interrupted(snapshot: Path, ckpt: Checkpoint, blobs: Path) -> None:
    """Name an interrupted Hub download (snapshot links to nothing, ``blobs/*.incomplete``) and the
    command that finishes it, instead of a bare "no weight file"."""
    dangling = sorted(p.name for p in snapshot.iterdir() if p.is_symlink() and not p.exists())
    partial = list(blobs.glob("*.incomplete")) if blobs.is_dir() else []
    if dangling or partial:
        raise CheckpointError(
            f"checkpoint {ckpt.revision}: its download was interrupted ({len(partial)} incomplete "
            f"file(s) in {blobs}; {', '.join(dangling) or 'no file'} in {snapshot} point(s) to "
            "nothing); finish it with `ckpt-analysis prefetch JOB` online"
        )


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
    mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6, non-zip) torch.save files cannot be mapped
    return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))


def read_layout(files: list[Path], revision: str) -> dict[str, tuple[int, ...]]:
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
            raise CheckpointError(
                f"checkpoint {revision}: weights file {path.name} is corrupt or unreadable: {one_line(exc)}"
            ) from exc
    return layout


BOOKKEEPING_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "architectures",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_dropout",
        "hidden_dropout",
        "classifier_dropout",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
"""Config fields that never change what a checkpoint computes in eval mode; every other field must
agree across a job's checkpoints (docs/jobs.md, "What is checked before anything runs")."""


def check_layout(source: CheckpointSource, ckpts: list[Checkpoint]) -> dict[str, Any]:
    """Check every checkpoint computes the same function family: equal configs and parameter layouts.

    Every config field outside :data:`BOOKKEEPING_KEYS` is compared, and every parameter name and
    shape. The checkpoint that differs from the majority is blamed, beside one that agrees.
    Returns the majority config.
    """
    if not ckpts:
        raise CheckpointError("the checkpoint selection is empty")
    configs = [source.config(c) for c in ckpts]
    keys = sorted({k for c in configs for k in c} - BOOKKEEPING_KEYS)
    for key in keys:
        values = [json.dumps(c.get(key), sort_keys=True) for c in configs]
        _blame_minority(ckpts, values, functools.partial(_config_value, key, values))
    layouts = [read_layout(source.weight_files(c), c.revision) for c in ckpts]
    source.check_keys(ckpts[0], layouts[0])
    signatures = [json.dumps(sorted(x.items())) for x in layouts]
    usual = layouts[_majority_index(signatures)]
    _blame_minority(ckpts, signatures, functools.partial(_layout_entry, layouts, usual))
    return standard_names(
        configs[_majority_index([json.dumps(c, sort_keys=True, default=str) for c in configs])]
    )


STANDARD_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)
"""Config fields the analyses read by these names, whatever a model family calls them."""


def standard_names(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` plus :data:`STANDARD_KEYS` under the names transformers maps a family's own
    to (GPT-2's ``n_layer``, ``n_embd``, ``n_head``, ``n_positions``), where the file lacks them."""
    from transformers import AutoConfig

    try:
        parsed = AutoConfig.for_model(**config)
    except (KeyError, ValueError, TypeError):  # no or an unknown model_type: the file as it is
        return config
    found = {k: getattr(parsed, k, None) for k in STANDARD_KEYS if k not in config}
    return {**config, **{k: v for k, v in found.items() if v is not None}}


def _config_value(key: str, values: list[str], i: int, minority: int) -> str:
    return f"{key} = {values[i]}"


def _layout_entry(
    layouts: list[dict[str, tuple[int, ...]]], usual: dict[str, tuple[int, ...]], i: int, minority: int
) -> str:
    name = sorted(set(layouts[minority].items()) ^ set(usual.items()))[0][0]
    return f"parameter {name!r} with shape {layouts[i].get(name, 'absent')}"


def _majority_index(values: list[str]) -> int:
    common = collections.Counter(values).most_common(1)[0][0]
    return values.index(common)


def _blame_minority(ckpts: list[Checkpoint], values: list[str], describe: Callable[[int, int], str]) -> None:
    """Raise naming the first checkpoint whose value differs from the majority's, and one that agrees.

    ``describe(i, minority)`` says what checkpoint ``i`` has where ``minority`` differs.
    """
    agree = _majority_index(values)
    for i, value in enumerate(values):
        if value != values[agree]:
            raise CheckpointError(
                f"architecture mismatch: checkpoint {ckpts[i].revision} has {describe(i, i)}, "
                f"where {ckpts[agree].revision} and the majority have {describe(agree, i)}"
            )


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


def prefetch(spec: CheckpointsSpec, *, offline: bool) -> tuple[list[str], list[str]]:
    """Download (or, offline, only look up) every selected revision; returns (cached, missing).

    A revision counts as cached only with its config and weight files. A revision or repo the Hub
    does not have is missing; any other failure (network, authentication) is raised as one line.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    source = CheckpointSource.from_spec(spec)
    if not isinstance(source, HubSource):
        raise JobSpecError("prefetch applies to checkpoints.source = 'hub' only")
    cached, missing = [], []
    for ckpt in source.checkpoints():
        try:
            folder = snapshot_download(
                str(spec.repo),
                revision=ckpt.revision,
                cache_dir=spec.cache_dir,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
            )
            _weight_files_in(Path(folder), ckpt)
            cached.append(ckpt.revision)
        except (LocalEntryNotFoundError, RevisionNotFoundError, CheckpointError) as exc:
            log.info("revision %s is missing: %s", ckpt.revision, one_line(exc))
            missing.append(ckpt.revision)
        except Exception as exc:
            raise CheckpointError(
                f"could not fetch revision {ckpt.revision} of {spec.repo}: {one_line(exc)}"
            ) from exc
    return cached, missing


def _repo_cache(spec: CheckpointsSpec) -> Path:
    """The repo's folder in the Hub cache: ``checkpoints.cache_dir``, else ``HF_HUB_CACHE``, else
    ``HF_HOME/hub`` (``~/.cache/huggingface/hub``), as huggingface_hub resolves it."""
    cache = hf_cache_dir(spec.cache_dir, env_var="HF_HUB_CACHE", subfolder="hub")
    return cache / ("models--" + str(spec.repo).replace("/", "--"))


def hub_cache_complete(spec: CheckpointsSpec) -> bool:
    """Whether every selected Hub revision has its config and weights in the cache, looked up
    without importing huggingface_hub (which reads ``HF_HUB_OFFLINE`` once, at import)."""
    if spec.source != "hub" or spec.repo is None:
        return False
    base = _repo_cache(spec)
    try:
        ckpts = HubSource(spec).checkpoints()
        for ckpt in ckpts:
            folder = base / "snapshots" / (base / "refs" / ckpt.revision).read_text().strip()
            if not (folder / "config.json").is_file():
                return False
            _weight_files_in(folder, ckpt)
    except (OSError, CkptAnalysisError):
        return False
    return bool(ckpts)
