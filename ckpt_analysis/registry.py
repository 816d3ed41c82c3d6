"""The analysis registry: what an analysis declares (variables, units, compute) and how it is found."""

from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

import numpy as np

from ckpt_analysis.config import parse_dataclass
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.types import Columns

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ckpt_analysis.checkpoints import Checkpoint
    from ckpt_analysis.config import JobSpec
    from ckpt_analysis.data import EvalData


@dataclass(frozen=True, kw_only=True)
class Variable:
    """One result array: named dims with their sizes, dtype, chunking, fill value and a description.

    Build it with :meth:`of`; the dims, shape and chunks are checked to agree once, here.
    """

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    fill: float | int
    doc: str = ""

    def __post_init__(self) -> None:
        if not len(self.dims) == len(self.shape) == len(self.chunks):
            raise ValueError(
                f"variable {self.name}: dims {self.dims}, shape {self.shape}, chunks {self.chunks}"
            )
        if any(c < 1 or c > max(s, 1) for c, s in zip(self.chunks, self.shape, strict=True)):
            raise ValueError(f"variable {self.name}: chunks {self.chunks} do not fit shape {self.shape}")

    @classmethod
    def of(
        cls,
        name: str,
        sizes: Mapping[str, int],
        dtype: str = "float64",
        *,
        unit_axes: int = 1,
        chunk: Mapping[str, int] | None = None,
        fill: float | int | None = None,
        doc: str = "",
    ) -> Variable:
        """Declare a variable by ``{dim: size}``, in dimension order.

        The first ``unit_axes`` dims are chunked at 1 (the axes one unit writes a single entry of,
        so every unit owns whole chunks; 0 for an array one unit writes whole); the rest span one
        chunk unless ``chunk`` names their extent. ``fill`` defaults to NaN for floats and −1 for
        integers, so an unwritten unit is visible.
        """
        dims, shape = tuple(sizes), tuple(sizes.values())
        chunks = tuple(
            1 if i < unit_axes else (chunk or {}).get(d, max(s, 1)) for i, (d, s) in enumerate(sizes.items())
        )
        default = np.nan if np.dtype(dtype).kind == "f" else -1
        return cls(
            name=name,
            dims=dims,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            fill=default if fill is None else fill,
            doc=doc,
        )


@dataclass(frozen=True)
class Unit:
    """A unit of work: one analysis on one checkpoint (or a global unit), with its dependencies."""

    analysis: str
    key: str
    checkpoint: int | None = None
    deps: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.analysis}/{self.key}"


@dataclass(frozen=True)
class Write:
    """A block an analysis hands back: ``store[name][index] = values``."""

    name: str
    index: tuple[int | slice, ...]
    values: np.ndarray


@dataclass(frozen=True)
class PlanContext:
    """What an analysis may know when declaring variables and units (planner side)."""

    job: JobSpec
    checkpoints: list[Checkpoint]
    model_config: dict[str, Any]
    eval_data: EvalData
    tokenizer: PreTrainedTokenizerBase | None
    """None for pre-tokenized ids whose checkpoints carry no tokenizer (docs/jobs.md)."""

    @property
    def num_tokens(self) -> int:
        return self.eval_data.num_tokens


class Reader(Protocol):
    """``read(name)`` gives a whole stored array; ``read(name, rows=slice(a, b))`` rows a … b−1."""

    def __call__(self, name: str, rows: slice = ...) -> np.ndarray: ...


@dataclass
class UnitContext:
    """What an analysis gets when computing one unit (worker side)."""

    job: JobSpec
    checkpoints: list[Checkpoint]
    model_config: dict[str, Any]
    eval_data: EvalData
    load_model: Callable[[int], PreTrainedModel]
    read: Reader
    """Read a stored array (or rows of it), e.g. results of the units this one depends on."""
    sample_data: EvalData | None = None
    """The job's ``[sample]`` (a separate Hessian sample), if it names one."""
    kept: dict[str, Any] = field(default_factory=dict)
    """What units may keep for later units of the same worker (e.g. a basis on the device), by a
    key that names what determines it. It lives for one run of one worker process: inputs a run
    reads were finished before its units start, so they cannot change under it. Not shared
    between the threads of a worker beyond Python's own dict atomicity."""

    @property
    def hessian_data(self) -> EvalData:
        """Where Hessian samples come from: ``[sample]`` if the job has one, else the analysed data."""
        return self.sample_data or self.eval_data


P = TypeVar("P")
"""An analysis's parameters: the frozen dataclass its ``[analyses.<name>]`` table is parsed into."""


class Analysis(ABC, Generic[P]):
    """Base class of every analysis, generic over its parameters; subclasses register by ``name``.

    ``class Covariance(Analysis[CovarianceParams])`` is all it takes: the parameters class is read
    from the subscript, and ``self.params`` is typed by it.
    """

    name: ClassVar[str]
    params_type: ClassVar[type[Any]]
    times_without_inputs: ClassVar[bool] = False
    """Whether a unit's time is independent of its inputs' values, so ``plan --estimate`` may time
    it on the store's fill values where its inputs are too long a chain to run first
    (docs/cluster.md, "Know the cost before submitting")."""

    def __init__(self, params: P) -> None:
        self.params = params

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            concrete = [a for a in typing.get_args(base) if isinstance(a, type)]
            if concrete:
                cls.params_type = concrete[0]
                return

    @classmethod
    def from_spec(cls, table: dict[str, Any]) -> Self:
        """Build from the job's ``[analyses.<name>]`` table (unknown keys rejected)."""
        return cls(parse_dataclass(cls.params_type, table, f"analyses.{cls.name}"))

    def requires(self) -> tuple[type[Analysis[Any]], ...]:
        """Other analyses that must be in the same job (their results are read by this one)."""
        return ()

    def check(self, ctx: PlanContext) -> None:
        """Refuse, with one clear error, options that do not fit this job's model and data.

        Called once by the planner, before any unit is listed or anything is written; option
        checks that need no job belong in the parameters' ``__post_init__`` instead.
        """

    @abstractmethod
    def variables(self, ctx: PlanContext) -> list[Variable]:
        """The result arrays this analysis fills."""

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        """Extra index coordinates (e.g. ``site`` names) its variables use."""
        return {}

    def tables(self, ctx: PlanContext) -> Columns:
        """Static arrays known at plan time (e.g. a parameter layout), written by the planner."""
        return {}

    def units(self, ctx: PlanContext) -> list[Unit]:
        """Default: one independent unit per checkpoint."""
        return [Unit(self.name, f"step={c.step}", checkpoint=i) for i, c in enumerate(ctx.checkpoints)]

    @abstractmethod
    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write] | Iterator[Write]:
        """Compute one unit and hand back its blocks; never touches the store itself.

        A list or an iterator: an iterator's blocks are staged on disk one by one as it yields,
        for units whose results together would not fit in memory. Either way nothing reaches the
        store's chunks until every block is staged (:class:`~ckpt_analysis.staging.StagedWrites`),
        so a failure or kill midway leaves the unit to be recomputed and a failed ``--force``
        recompute keeps the earlier result.
        """


_REGISTRY: dict[str, type[Analysis[Any]]] = {}
A = TypeVar("A", bound=type[Analysis[Any]])


def register(cls: A) -> A:
    """Class decorator adding an analysis to the registry."""
    _REGISTRY[cls.name] = cls
    return cls


def get_analysis(name: str) -> type[Analysis[Any]]:
    """The registered analysis ``name``; the error lists the valid names."""
    import ckpt_analysis.analyses  # noqa: F401 - registers the built-in analyses

    if name not in _REGISTRY:
        raise JobSpecError(f"unknown analysis {name!r}; valid analyses: {', '.join(registered())}")
    return _REGISTRY[name]


def registered() -> list[str]:
    """The names of every registered analysis, sorted."""
    import ckpt_analysis.analyses  # noqa: F401 - registers the built-in analyses

    return sorted(_REGISTRY)


def build_analyses(job: JobSpec) -> list[Analysis[Any]]:
    """Instantiate the job's analyses in the order the job lists them; check their prerequisites."""
    analyses = [get_analysis(name).from_spec(table) for name, table in job.analyses.items()]
    for analysis in analyses:
        for needed in (a.name for a in analysis.requires()):
            if needed not in job.analyses:
                raise JobSpecError(f"analyses.{analysis.name} needs [analyses.{needed}] in the same job")
            if list(job.analyses).index(needed) > list(job.analyses).index(analysis.name):
                raise JobSpecError(f"[analyses.{needed}] must come before [analyses.{analysis.name}]")
    return analyses
