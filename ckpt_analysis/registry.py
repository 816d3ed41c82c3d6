"""The analysis registry: what an analysis declares (variables, units, compute) and how it is found."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from ckpt_analysis.config import parse_dataclass
from ckpt_analysis.errors import JobSpecError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ckpt_analysis.checkpoints import Checkpoint
    from ckpt_analysis.config import JobSpec
    from ckpt_analysis.data import EvalData


@dataclass(frozen=True)
class Variable:
    """One result array: its dims, shape, dtype and chunking (unit axis first, chunk extent 1)."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    fill: float | int = np.nan
    doc: str = ""


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
    tokenizer: PreTrainedTokenizerBase

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

    @property
    def hessian_data(self) -> EvalData:
        """Where Hessian samples come from: ``[sample]`` if the job has one, else the analysed data."""
        return self.sample_data or self.eval_data


class Analysis(ABC):
    """Base class of every analysis; subclasses register themselves by ``name``."""

    name: ClassVar[str]
    Params: ClassVar[type]

    def __init__(self, params: Any) -> None:
        self.params = params

    @classmethod
    def from_spec(cls, table: dict[str, Any]) -> Analysis:
        """Build from the job's ``[analyses.<name>]`` table (unknown keys rejected)."""
        return cls(parse_dataclass(cls.Params, table, f"analyses.{cls.name}"))

    def requires(self) -> tuple[str, ...]:
        """Other analyses that must be in the same job (their results are read by this one)."""
        return ()

    @abstractmethod
    def variables(self, ctx: PlanContext) -> list[Variable]:
        """The result arrays this analysis fills."""

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        """Extra index coordinates (e.g. ``site`` names) its variables use."""
        return {}

    def tables(self, ctx: PlanContext) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """Static arrays known at plan time (e.g. a parameter layout), written by the planner."""
        return {}

    def units(self, ctx: PlanContext) -> list[Unit]:
        """Default: one independent unit per checkpoint."""
        return [Unit(self.name, f"step={c.step}", checkpoint=i) for i, c in enumerate(ctx.checkpoints)]

    @abstractmethod
    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        """Compute one unit and return its blocks; never touches the store itself."""


_REGISTRY: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator adding an analysis to the registry."""
    _REGISTRY[cls.name] = cls
    return cls


def get_analysis(name: str) -> type[Analysis]:
    """The registered analysis ``name``; the error lists the valid names."""
    import ckpt_analysis.analyses  # noqa: F401 - registers the built-in analyses

    if name not in _REGISTRY:
        raise JobSpecError(f"unknown analysis {name!r}; valid analyses: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_analyses(job: JobSpec) -> list[Analysis]:
    """Instantiate the job's analyses in the order the job lists them; check their prerequisites."""
    analyses = [get_analysis(name).from_spec(table) for name, table in job.analyses.items()]
    for analysis in analyses:
        for needed in analysis.requires():
            if needed not in job.analyses:
                raise JobSpecError(f"analyses.{analysis.name} needs [analyses.{needed}] in the same job")
            if list(job.analyses).index(needed) > list(job.analyses).index(analysis.name):
                raise JobSpecError(f"[analyses.{needed}] must come before [analyses.{analysis.name}]")
    return analyses
