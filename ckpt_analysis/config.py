"""Job spec: strict dataclasses parsed from TOML; unknown keys are errors listing the valid ones."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.types import ExecutorKind, Selector

T = TypeVar("T")


def selector_predicate(selector: str) -> Callable[[int], bool]:
    """The step filter of a string selector; a bad one is a JobSpecError listing the valid forms."""
    if selector == "all":
        return lambda s: True
    if selector == "log":
        return lambda s: s == 0 or (s & (s - 1)) == 0
    if (match := re.fullmatch(r"every=(\d+)", selector)) and int(match.group(1)) > 0:
        n = int(match.group(1))
        return lambda s: s % n == 0
    match = re.fullmatch(r"(\d+):(\d+)(?::(\d+))?", selector)
    if match and int(match.group(3) or 1) > 0:
        lo, hi, stride = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
        return lambda s: lo <= s <= hi and (s - lo) % stride == 0
    raise JobSpecError(
        f"checkpoint selector {selector!r} is not valid; "
        "use 'all', 'log', 'every=N', 'A:B', 'A:B:N' (N >= 1) or a list"
    )


@dataclass(frozen=True)
class CheckpointsSpec:
    """Where the checkpoints come from and how they are loaded (docs/jobs.md): the keys every
    source takes. ``source`` picks the subclass that adds its own keys: :class:`HubCheckpoints`
    (``hub``), :class:`LocalCheckpoints` (``local``) or :class:`StateDictCheckpoints`
    (``state_dict``); another source's keys are refused when the job is parsed.
    """

    source: Literal["hub", "local", "state_dict"]
    select: Selector = "all"
    tokens_per_step: int | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    verify_digests: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.select, list):
            selector_predicate(self.select)

    @property
    def location(self) -> str:
        """Where the checkpoints are: the Hub repo, the run folder or the model config."""
        raise NotImplementedError

    def with_paths(self, absolute: Callable[[str], str]) -> CheckpointsSpec:
        """This spec with its source's file paths made absolute by ``absolute``."""
        return self


@dataclass(frozen=True, kw_only=True)
class HubCheckpoints(CheckpointsSpec):
    """``source = "hub"``: revisions of a Hugging Face Hub repo, through a cache folder."""

    repo: str
    revisions: Selector = "pythia"
    cache_dir: str | None = None
    steps: dict[str, int] = field(default_factory=dict)
    """Revision name → training step, for revisions not named ``stepN``."""

    @property
    def location(self) -> str:
        return self.repo

    def with_paths(self, absolute: Callable[[str], str]) -> CheckpointsSpec:
        cache = self.cache_dir
        return dataclasses.replace(self, cache_dir=cache and absolute(cache))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.revisions != "pythia" and not isinstance(self.revisions, list):
            raise JobSpecError(
                f"checkpoints.revisions = {self.revisions!r} must be 'pythia' or a list of revision names"
            )
        for revision, step in self.steps.items():
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise JobSpecError(f"checkpoints.steps.{revision} = {step!r} must be a step number >= 0")


@dataclass(frozen=True, kw_only=True)
class LocalCheckpoints(CheckpointsSpec):
    """``source = "local"``: a run folder of ``save_pretrained`` checkpoints."""

    path: str
    pattern: str | None = None
    """Checkpoint folder names, with ``{step}`` (default: ``checkpoint-{step}`` or ``step_{step}``)."""

    @property
    def location(self) -> str:
        return self.path

    def with_paths(self, absolute: Callable[[str], str]) -> CheckpointsSpec:
        return dataclasses.replace(self, path=absolute(self.path))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern is not None and "{step}" not in self.pattern:
            raise JobSpecError(f"checkpoints.pattern {self.pattern!r} must contain '{{step}}'")


@dataclass(frozen=True, kw_only=True)
class StateDictCheckpoints(CheckpointsSpec):
    """``source = "state_dict"``: plain state-dict files sharing one model config."""

    files: list[str]
    """Glob patterns of ``*.pt`` / ``*.safetensors`` files; each file name ends in its step."""
    config: str
    """A ``config.json``, or the folder holding it."""

    @property
    def location(self) -> str:
        return self.config

    def with_paths(self, absolute: Callable[[str], str]) -> CheckpointsSpec:
        files = [absolute(f) for f in self.files]
        return dataclasses.replace(self, config=absolute(self.config), files=files)


CHECKPOINT_SPECS: dict[str, type[CheckpointsSpec]] = {
    "hub": HubCheckpoints,
    "local": LocalCheckpoints,
    "state_dict": StateDictCheckpoints,
}
"""The ``[checkpoints]`` table's class by its ``source``."""

_UNSET: tuple[Any, ...] = (None, [], {}, "pythia")
"""Values a stored spec of an older version wrote for another source's keys (it stored them all)."""


def parse_checkpoints(table: Any) -> CheckpointsSpec:
    """``[checkpoints]`` as the spec class its ``source`` names; another source's keys are refused
    by name, with the keys this source takes."""
    if not isinstance(table, dict):
        raise JobSpecError(f"[checkpoints] must be a table, got {type(table).__name__}")
    source = table.get("source")
    if source not in CHECKPOINT_SPECS:
        raise JobSpecError(
            f"checkpoints.source = {source!r} is not valid; choose one of: "
            + ", ".join(map(repr, CHECKPOINT_SPECS))
        )
    cls = CHECKPOINT_SPECS[source]
    keys = {name: {f.name for f in dataclasses.fields(c)} for name, c in CHECKPOINT_SPECS.items()}
    owner = {k: name for name, own in keys.items() for k in own - keys[source]}
    table = {k: v for k, v in table.items() if not (k in owner and any(v == u for u in _UNSET))}
    foreign = sorted(set(table) & set(owner))
    if foreign:
        raise JobSpecError(
            f"checkpoints.{foreign[0]} belongs to source = {owner[foreign[0]]!r}, not {source!r}; "
            f"source = {source!r} takes: {', '.join(sorted(keys[source]))}"
        )
    return parse_dataclass(cls, table, "checkpoints")


@dataclass(frozen=True)
class DataSpec:
    """The analysed token set (docs/jobs.md): a built-in task (``addition``, ``subtraction``,
    ``grammar``, ``topics``) or ``datasets``.

    ``token_text = false`` skips decoding every scored token and its context into the store's
    ``token_text``/``token_context`` tables; use it for large corpora (e.g. corpus statistics).
    """

    source: Literal["addition", "subtraction", "grammar", "dataset", "topics"]
    num_examples: int = 256
    seed: int = 1234
    path: str | None = None
    format: Literal["auto", "disk", "json", "jsonl", "parquet", "text", "arrow", "csv"] = "auto"
    split: str | None = None
    subset: str | None = None
    cache_dir: str | None = None
    text_column: str = "text"
    ids_column: str | None = None
    score_mask_column: str | None = None
    label_columns: list[str] = field(default_factory=list)
    seq_len: int = 128
    num_sequences: int | None = None
    add_bos: bool = False
    token_text: bool = True
    pad_id: int | None = None
    """The id that pads pre-tokenized rows shorter than ``seq_len`` (default: the tokenizer's)."""

    @property
    def needs_tokenizer(self) -> bool:
        """Whether this token set needs the checkpoints' tokenizer: built-in tasks, text to
        tokenize, a BOS to add, or token text to decode (pre-tokenized ids need none)."""
        if self.source in ("addition", "subtraction", "grammar"):
            return True
        return self.source == "dataset" and (self.ids_column is None or self.add_bos or self.token_text)

    def __post_init__(self) -> None:
        if self.pad_id is not None and self.pad_id < 0:
            raise JobSpecError(f"data.pad_id = {self.pad_id} must be a token id (>= 0)")
        for key in ("num_examples", "seq_len", "num_sequences"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise JobSpecError(f"data.{key} = {value} must be at least 1")


@dataclass(frozen=True)
class ComputeSpec:
    """How units are executed (docs/jobs.md)."""

    executor: ExecutorKind = "local"
    workers: int = 2
    threads_per_worker: int = 1
    torch_threads: int = 1
    batch_size: int | Literal["auto"] = "auto"
    """Sequences per batch; ``"auto"``: sized to the free GPU memory on CUDA, 32 on the CPU
    (``ckpt_analysis.batching``)."""
    vectors_per_pass: int | Literal["auto"] = "auto"
    """POLCA basis vectors per forward-mode pass; ``"auto"``: 4 on the CPU, sized to the free GPU
    memory on CUDA (``ckpt_analysis.batching.directional_pass``)."""

    def __post_init__(self) -> None:
        for key in ("workers", "threads_per_worker", "torch_threads", "batch_size", "vectors_per_pass"):
            if getattr(self, key) != "auto" and getattr(self, key) < 1:
                raise JobSpecError(f"compute.{key} = {getattr(self, key)} must be at least 1")


@dataclass(frozen=True)
class SlurmSpec:
    """``[slurm]``: resources of the sbatch arrays that ``ckpt-analysis submit`` writes (docs/jobs.md).

    ``cpus_per_task`` defaults to ``compute.torch_threads``; ``shards`` caps the array tasks per
    stage; ``max_parallel`` throttles an array (``%K``); ``setup`` lines run first in every task
    (``module load …``, ``source venv/bin/activate``); ``sbatch_args`` are extra ``#SBATCH`` options.
    The same resources serve ``compute.executor = "slurm"`` (dask-jobqueue workers, one job each),
    whose workers reach the scheduler over ``interface`` (e.g. ``"ib0"``; ``"lo"`` on one node).
    """

    partition: str | None = None
    account: str | None = None
    time: str = "01:00:00"
    mem: str = "8G"
    cpus_per_task: int | None = None
    gres: str | None = None
    shards: int = 16
    max_parallel: int | None = None
    setup: list[str] = field(default_factory=list)
    sbatch_args: list[str] = field(default_factory=list)
    interface: str | None = None

    def __post_init__(self) -> None:
        for key in ("cpus_per_task", "shards", "max_parallel"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise JobSpecError(f"slurm.{key} = {value} must be at least 1")
        for key in ("partition", "account", "time", "mem", "gres", "interface"):
            value = getattr(self, key)
            if value is not None and not _SBATCH_VALUE.fullmatch(value):
                raise JobSpecError(
                    f"slurm.{key} = {value!r} may hold only letters, digits and . , : = + @ % / - _"
                )
        for i, arg in enumerate(self.sbatch_args):
            if not arg.startswith("-"):
                raise JobSpecError(
                    f"slurm.sbatch_args[{i}] = {arg!r} must be one sbatch option, e.g. '--qos=high'"
                )


_SBATCH_VALUE = re.compile(r"[\w.,:=+@%/-]+")
"""What a ``[slurm]`` value written into an ``#SBATCH`` line may hold: no spaces, quotes or shell syntax."""
_JOB_NAME = re.compile(r"[\w.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class JobSpec:
    """A whole job: checkpoints × analyses over one token set, into one store."""

    name: str
    output: str
    checkpoints: CheckpointsSpec
    data: DataSpec
    analyses: dict[str, dict[str, Any]]
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    sample: DataSpec | None = None
    """``[sample]``: a separate Hessian sample (same keys as ``[data]``); default: the job's data."""

    def __post_init__(self) -> None:
        if not _JOB_NAME.fullmatch(self.name):
            raise JobSpecError(
                f"name = {self.name!r} may hold only letters, digits, '.', '-' and '_' "
                "(it names SLURM jobs and files)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The normalised spec as plain data (stored in the results' root attrs)."""
        return dataclasses.asdict(self)


def require_distinct(values: list[Any], where: str) -> None:
    """A list option that must name at least one item, each once (e.g. activation sites)."""
    if not values:
        raise JobSpecError(f"{where} is empty; name at least one")
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise JobSpecError(f"{where} names {', '.join(repeated)} more than once")


def parse_dataclass(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Errors name the offending table (``where``) and list the valid keys or values.
    """
    if not isinstance(data, dict):
        raise JobSpecError(f"[{where}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown and not fields:
        raise JobSpecError(f"[{where}] takes no options; remove {', '.join(map(repr, unknown))}")
    if unknown:
        raise JobSpecError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in [{where}]; valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    required = [n for n, f in fields.items() if _is_required(f)]
    missing = [n for n in required if n not in data]
    if missing:
        raise JobSpecError(f"missing required key(s) {', '.join(map(repr, missing))} in [{where}]")
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**values)


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            valid = ", ".join(map(repr, get_args(hint)))
            raise JobSpecError(f"{where} = {value!r} is not valid; choose one of: {valid}")
        return value
    if origin in (Union, types.UnionType):
        errors: list[JobSpecError] = []
        for arm in get_args(hint):
            try:
                return _check_type(value, arm, where)
            except JobSpecError as error:
                errors.append(error)
        shaped = [e for a, e in zip(get_args(hint), errors, strict=True) if _same_shape(value, a)]
        if len(shaped) == 1:  # e.g. a bad string where a Literal or a list of them is allowed
            raise shaped[0]
        raise JobSpecError(f"{where} = {value!r} has the wrong type (expected {hint})")
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise JobSpecError(f"{where} must be a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is type(None):
        if value is not None:
            raise JobSpecError(f"{where} must be empty")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise JobSpecError(f"{where} = {value!r} must be {hint.__name__}")
    return value


def _same_shape(value: Any, hint: Any) -> bool:
    """Whether ``value`` is a list exactly when ``hint`` is one, and a string only where ``hint``
    takes strings, so that arm's error is the one."""
    if isinstance(value, str):
        return hint is str or (
            get_origin(hint) is Literal and all(isinstance(a, str) for a in get_args(hint))
        )
    return isinstance(value, list) == (get_origin(hint) is list)


def to_toml(job: dict[str, Any]) -> str:
    """A job mapping (e.g. :meth:`JobSpec.to_dict`) as TOML that :func:`load_job` reads back to the
    same spec; ``None`` values are left out (they are every such option's default)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                tables.append((f"{prefix}{key}", value))
            elif value is not None:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")

    emit("", job)
    while tables:
        name, table = tables.pop(0)
        lines.append(f"\n[{name}]")
        emit(f"{name}.", table)
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else a quoted one."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    """TOML for a scalar or list; JSON's strings, numbers and arrays are TOML's."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def load_job(path: str | Path, *, output: str | None = None) -> JobSpec:
    """Read and validate a job TOML; relative paths resolve against the job file's folder."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(f"job file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(f"{path}: not valid TOML: {exc}") from exc
    if output is not None:
        raw["output"] = output
    return job_from_dict(raw, base=path.parent)


def job_from_dict(raw: dict[str, Any], *, base: Path) -> JobSpec:
    """Validate a job mapping (the parsed TOML) and resolve its relative paths against ``base``."""
    _reject_control_characters(raw, "job")
    raw = dict(raw)
    raw.setdefault("name", "job")
    if "analyses" not in raw or not raw["analyses"]:
        raise JobSpecError("the job names no analyses; add an [analyses.<name>] table")
    if "checkpoints" in raw:
        raw["checkpoints"] = parse_checkpoints(raw["checkpoints"])
    nested = {
        "data": DataSpec,
        "sample": DataSpec,
        "compute": ComputeSpec,
        "slurm": SlurmSpec,
    }
    if raw.get("sample", ...) is None:  # a stored spec without [sample]
        del raw["sample"]
    for key, cls in nested.items():
        if key in raw:
            raw[key] = parse_dataclass(cls, raw[key], key)
    analyses = raw.get("analyses")
    if not isinstance(analyses, dict) or not all(isinstance(v, dict) for v in analyses.values()):
        raise JobSpecError("[analyses] must hold one table per analysis, e.g. [analyses.covariance]")
    job = parse_dataclass(JobSpec, raw, "job")
    return _resolve_paths(job, base)


def _reject_control_characters(value: Any, where: str) -> None:
    """No string of a job may hold a newline or other control character: several end up in shell
    scripts and ``#SBATCH`` lines, where one would start a new command (docs/jobs.md, [slurm])."""
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_control_characters(key, where)
            _reject_control_characters(item, f"{where}.{key}" if where != "job" else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _reject_control_characters(item, f"{where}[{i}]")
    elif isinstance(value, str) and (found := _CONTROL.search(value)):
        raise JobSpecError(f"{where} = {value!r} holds a control character ({found.group()!r}); remove it")


def _resolve_paths(job: JobSpec, base: Path) -> JobSpec:
    def absolute(p: str | None) -> str | None:
        if p is None or "://" in p:
            return p
        return str((base / Path(p).expanduser()).resolve())

    ck = job.checkpoints.with_paths(lambda p: str(absolute(p)))
    if ck.tokenizer is not None and (base / ck.tokenizer).exists():  # else a Hub id
        ck = dataclasses.replace(ck, tokenizer=absolute(ck.tokenizer))
    data, sample = _resolve_data(job.data, base), job.sample and _resolve_data(job.sample, base)
    return dataclasses.replace(
        job, output=str(absolute(job.output)), checkpoints=ck, data=data, sample=sample
    )


def hf_cache_dir(given: str | None, *, env_var: str, subfolder: str) -> Path:
    """A Hugging Face cache folder as its library resolves it: ``given`` (a job's ``cache_dir``),
    else ``$env_var`` (``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``), else ``HF_HOME/<subfolder>``
    (``~/.cache/huggingface/<subfolder>``)."""
    env = os.environ
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return Path(given or env.get(env_var) or Path(home) / subfolder).expanduser()


def _resolve_data(data: DataSpec, base: Path) -> DataSpec:
    """A dataset path that exists next to the job file becomes absolute, else it may be a Hub name;
    ``cache_dir`` resolves against the job file's folder."""
    if data.cache_dir is not None:
        data = dataclasses.replace(data, cache_dir=str((base / Path(data.cache_dir).expanduser()).resolve()))
    if data.path is not None and data.source == "dataset" and (base / data.path).exists():
        return dataclasses.replace(data, path=str((base / Path(data.path).expanduser()).resolve()))
    return data
