"""The planner: validate a job end to end, then lay out its units and create its store once."""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ckpt_analysis.checkpoints import (
    Checkpoint,
    CheckpointSource,
    check_layout,
)
from ckpt_analysis.config import JobSpec
from ckpt_analysis.data import EvalData, label_variable, load_eval_data
from ckpt_analysis.digests import job_identity
from ckpt_analysis.errors import CheckpointError, DataError, JobSpecError, StoreError
from ckpt_analysis.registry import Analysis, PlanContext, Unit, Variable, build_analyses
from ckpt_analysis.store import (
    DONE,
    check_output,
    create_store,
    creation_lock,
    grow_store,
    read_array,
    store_meta,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ckpt_analysis.types import Columns

log = logging.getLogger(__name__)

_VERSIONED = ("ckpt-analysis", "torch", "transformers", "zarr", "xarray", "dask", "numpy")


@dataclass
class Plan:
    """Everything the store is created from; built without writing anything."""

    job: JobSpec
    checkpoints: list[Checkpoint]
    model_config: dict[str, Any]
    eval_data: EvalData
    tokenizer: PreTrainedTokenizerBase | None
    token_text: list[str] | None
    token_context: list[str] | None
    analyses: list[Analysis[Any]]
    units: list[Unit]
    sample: EvalData | None = None

    @property
    def context(self) -> PlanContext:
        return PlanContext(self.job, self.checkpoints, self.model_config, self.eval_data, self.tokenizer)


def make_plan(job: JobSpec) -> Plan:
    """Validate everything (analyses, checkpoints and their layout, data) and list the units.

    Raises a :class:`~ckpt_analysis.errors.CkptAnalysisError` naming the culprit on bad input;
    nothing is written.
    """
    analyses = build_analyses(job)
    source = CheckpointSource.from_spec(job.checkpoints)
    ckpts = source.checkpoints()
    config = check_layout(source, ckpts)
    tokenizer = _tokenizer(source, ckpts[0], job)
    data = load_eval_data(
        job.data,
        tokenizer,
        max_positions=config.get("max_position_embeddings"),
        vocab_size=config["vocab_size"],
    )
    _check_ids(tokenizer, job, data)
    sample = None
    if job.sample is not None:
        limits = {"max_positions": config.get("max_position_embeddings"), "vocab_size": config["vocab_size"]}
        sample = load_eval_data(job.sample, tokenizer, **limits)
    text, context = data.token_strings(tokenizer) if tokenizer and job.data.token_text else (None, None)
    ctx = PlanContext(job, ckpts, config, data, tokenizer)
    for analysis in analyses:
        analysis.check(ctx)
    units = _ordered_units([u for a in analyses for u in a.units(ctx)])
    return Plan(job, ckpts, config, data, tokenizer, text, context, analyses, units, sample)


def _tokenizer(
    source: CheckpointSource[Any], first: Checkpoint, job: JobSpec
) -> PreTrainedTokenizerBase | None:
    """The checkpoints' tokenizer, checked where the data needs one (``DataSpec.needs_tokenizer``);
    where it needs none (pre-tokenized ids), the tokenizer if the checkpoints carry a usable one,
    else None (docs/jobs.md, "Pre-tokenized ids without a tokenizer")."""
    specs = [job.data, *([job.sample] if job.sample else [])]
    if job.data.source == "topics" or any(s.needs_tokenizer for s in specs):
        tokenizer = source.tokenizer(first)
        if job.data.source != "topics":  # synthetic ids; the tokenizer is never used
            _check_vocabulary(tokenizer, job)
        return tokenizer
    try:
        tokenizer = source.tokenizer(first)
    except CheckpointError:
        return None
    return tokenizer if _has_vocabulary(tokenizer) else None


def _has_vocabulary(tokenizer: PreTrainedTokenizerBase) -> bool:
    """False for a tokenizer of special tokens only: transformers builds one from a checkpoint
    folder without tokenizer files, and it decodes every token to ''."""
    return len(tokenizer) > len(set(tokenizer.all_special_ids))


def _check_vocabulary(tokenizer: PreTrainedTokenizerBase, job: JobSpec) -> None:
    if not _has_vocabulary(tokenizer):
        raise DataError(
            f"the tokenizer from {_tokenizer_source(job)} has only special tokens ({len(tokenizer)} in "
            "all): the folder holds no tokenizer files; set checkpoints.tokenizer to a tokenizer folder "
            "(pre-tokenized ids with data.token_text = false need none)"
        )


def _check_ids(tokenizer: PreTrainedTokenizerBase | None, job: JobSpec, data: EvalData) -> None:
    """Refuse data whose ids the tokenizer cannot decode into ``token_text``."""
    top = int(data.input_ids[data.attention_mask > 0].max())
    if (
        tokenizer is not None
        and job.data.source != "topics"
        and job.data.token_text
        and top >= len(tokenizer)
    ):
        raise DataError(
            f"the data holds token id {top}, but the tokenizer from {_tokenizer_source(job)} has "
            f"{len(tokenizer)} tokens; set checkpoints.tokenizer to the data's tokenizer "
            "(or data.token_text = false)"
        )


def _tokenizer_source(job: JobSpec) -> str:
    return job.checkpoints.tokenizer or "the first checkpoint's folder"


def stored_units(meta: dict[str, Any]) -> list[Unit]:
    """The units a store was planned with, from its root attributes (:func:`prepare_store`)."""
    return [
        Unit(u["analysis"], u["id"].split("/", 1)[1], u["checkpoint"], tuple(u["deps"]))
        for u in meta["units"]
    ]


def unit_stages(units: Sequence[Unit]) -> list[int]:
    """Each unit's stage: 0 without dependencies, else one more than its latest dependency's.

    Units of one stage never depend on each other, so a stage can run as one SLURM array.
    """
    stage: dict[str, int] = {}
    for unit in units:
        stage[unit.id] = 1 + max((stage[d] for d in unit.deps), default=-1)
    return [stage[u.id] for u in units]


def _ordered_units(units: list[Unit]) -> list[Unit]:
    """Check ids are unique and dependencies exist and precede their dependents."""
    seen: set[str] = set()
    for unit in units:
        if unit.id in seen:
            raise JobSpecError(f"duplicate unit {unit.id}")
        missing = [d for d in unit.deps if d not in seen]
        if missing:
            raise JobSpecError(f"unit {unit.id} depends on {missing}, which are not planned before it")
        seen.add(unit.id)
    return units


def _coords(plan: Plan) -> Columns:
    ck = plan.checkpoints
    coords: Columns = {
        "step": (("step",), np.array([c.step for c in ck], dtype=np.int64)),
        "revision": (("step",), np.array([c.revision for c in ck], dtype=object)),
        "tokens_seen": (("step",), np.array([-1 if c.tokens_seen is None else c.tokens_seen for c in ck])),
        "unit_id": (("unit",), np.array([u.id for u in plan.units], dtype=object)),
    }
    for analysis in plan.analyses:
        for name, values in analysis.coords(plan.context).items():
            if name in coords and not np.array_equal(coords[name][1], values):
                raise JobSpecError(f"analyses disagree on the {name!r} coordinate")
            coords[name] = ((name,), values)
    return coords


def _tables(plan: Plan) -> Columns:
    """The analysed token set (docs/jobs.md), stored so later queries can show what a token was."""
    data = plan.eval_data
    seq, pos = data.token_index
    grid = ("sequence", "position")
    tables: Columns = {
        "input_ids": (grid, data.input_ids),
        "attention_mask": (grid, data.attention_mask),
        "score_mask": (grid, data.score_mask.astype(np.int8)),
        "token_sequence": (("token",), seq),
        "token_position": (("token",), pos),
        "token_id": (("token",), data.input_ids[seq, pos]),
    }
    if plan.token_text is not None and plan.token_context is not None:
        tables["token_text"] = (("token",), np.array(plan.token_text, dtype=object))
        tables["token_context"] = (("token",), np.array(plan.token_context, dtype=object))
    for name, values in data.token_labels().items():
        tables[label_variable(name)] = (("token",), values)
    if plan.sample is not None:
        sample_grid = ("sample_sequence", "sample_position")
        tables["sample_input_ids"] = (sample_grid, plan.sample.input_ids)
        tables["sample_attention_mask"] = (sample_grid, plan.sample.attention_mask)
        tables["sample_score_mask"] = (sample_grid, plan.sample.score_mask.astype(np.int8))
    for analysis in plan.analyses:
        for name, (dims, values) in analysis.tables(plan.context).items():
            if name in tables and not np.array_equal(tables[name][1], values):
                raise JobSpecError(
                    f"analyses disagree on the {name!r} table (e.g. different parameter patterns)"
                )
            tables[name] = (dims, values)
    return tables


def _variables(plan: Plan) -> list[Variable]:
    variables = [v for a in plan.analyses for v in a.variables(plan.context)]
    names = [v.name for v in variables]
    if len(set(names)) != len(names):
        raise JobSpecError(f"analyses declare the same variable twice: {names}")
    done = Variable.of(DONE, {"unit": len(plan.units)}, "int8", fill=0, doc="1 once a unit is complete")
    return [*variables, done]


def versions() -> dict[str, str]:
    """Toolkit and library versions recorded with results."""
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def check_job_output(
    job: JobSpec, *, force: bool, identity: tuple[str, dict[str, str]] | None = None
) -> Literal["create", "resume", "replace"]:
    """:func:`~ckpt_analysis.store.check_output` for ``job``: its hash and parts (``identity``, else
    :func:`job_identity`) and our version."""
    spec_hash, parts = identity or job_identity(job)
    return check_output(job.output, spec_hash, force=force, parts=parts, version=versions()["ckpt-analysis"])


def prepare_store(job: JobSpec, *, force: bool) -> Literal["create", "resume", "replace"]:
    """Create the job's store unless a store of the same spec exists (then resume).

    Everything is validated before anything is written: a refused job leaves no store, lock file
    or folder. Then the store's creation lock (:func:`~ckpt_analysis.store.creation_lock`) is
    held, so of two runs starting at once one creates the store and the other resumes it.
    """
    identity = job_identity(job)
    check = functools.partial(check_job_output, job, force=force, identity=identity)
    plan = make_plan(job) if check() != "resume" else None
    with creation_lock(job.output):
        action = check()
        if action != "resume":
            _create(plan or make_plan(job), identity, replace=action == "replace")
    return action


def _create(plan: Plan, identity: tuple[str, dict[str, str]], *, replace: bool) -> None:
    create_store(
        plan.job.output,
        variables=_variables(plan),
        coords=_coords(plan),
        tables=_tables(plan),
        meta=_meta(plan, *identity),
        replace=replace,
    )
    log.info("created %s with %d units", plan.job.output, len(plan.units))


def _meta(plan: Plan, spec_hash: str, parts: dict[str, str]) -> dict[str, Any]:
    """The store's root attributes: the job, its hash and parts, versions, model, checkpoints, units."""
    job = plan.job
    return {
        "job_spec": job.to_dict(),
        "spec_hash": spec_hash,
        "spec_parts": parts,
        "versions": versions(),
        "model_id": job.checkpoints.location,
        "model_config": plan.model_config,
        "checkpoint_refs": [c.ref for c in plan.checkpoints],
        "units": [
            {"id": u.id, "analysis": u.analysis, "checkpoint": u.checkpoint, "deps": list(u.deps)}
            for u in plan.units
        ],
    }


def require_per_checkpoint(plan: Plan) -> None:
    """Refuse analyses a growing store cannot hold: units spanning checkpoints, or variables whose
    first axis is not ``step`` (``watch``; docs/jobs.md, "Watching a run")."""
    where = {u.id: u.checkpoint for u in plan.units}
    spanning = {
        u.analysis
        for u in plan.units
        if u.checkpoint is None or any(where[d] != u.checkpoint for d in u.deps)
    }
    spanning |= {a.name for a in plan.analyses for v in a.variables(plan.context) if "step" in v.dims[1:]}
    if spanning:
        raise JobSpecError(
            f"watch runs analyses whose units are per checkpoint; {', '.join(sorted(spanning))} "
            "span checkpoints: run them with `ckpt-analysis run` once training ends"
        )


def planned_steps(output: str | Path) -> list[int]:
    """Steps of the checkpoints a store was last planned for (none: no store yet). Its ``step``
    array may be longer, after a growth killed midway (:func:`extend_store`)."""
    if not (Path(output) / "zarr.json").is_file():
        return []
    planned = len(store_meta(output)["checkpoint_refs"])
    return [int(s) for s in read_array(output, "step")[:planned]]


def extend_store(job: JobSpec) -> int:
    """Grow the job's store, planned for the first of ``job``'s checkpoints, to all of them
    (``watch``): step-axis arrays grow, new units are appended after the stored ones (so their
    indices and ``unit_done`` flags stay), and the hash becomes this job's. Returns how many
    checkpoints were added. The stored checkpoints must be the first of the job's, by step and
    content (the stored hash must be the job's over them)."""
    plan = make_plan(job)
    require_per_checkpoint(plan)
    meta = store_meta(job.output)
    old = len(planned_steps(job.output))
    steps = [c.step for c in plan.checkpoints]
    earlier = dataclasses.replace(job, checkpoints=dataclasses.replace(job.checkpoints, select=steps[:old]))
    if len(steps) < old or meta["spec_hash"] != job_identity(earlier)[0]:
        raise StoreError(
            f"{job.output} does not hold this job's results for its first {old} checkpoints "
            f"(now {steps}); use another output path"
        )
    stored = stored_units(meta)
    known = {u.id for u in stored}
    plan.units = [*stored, *(u for u in plan.units if u.id not in known)]
    shapes = {v.name: v.shape for v in _variables(plan) if v.dims[0] in ("step", "unit")}
    coords = _coords(plan)
    columns = {n: coords[n] for n in ("step", "revision", "tokens_seen", "unit_id")}
    grow_store(job.output, shapes=shapes, columns=columns, meta=_meta(plan, *job_identity(job)))
    return len(steps) - old
