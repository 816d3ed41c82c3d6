"""Hessian eigenpairs, trace and density per checkpoint, and POLCA's iterative basis (docs/hessian.md)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import torch

from ckpt_analysis.batching import batch_size
from ckpt_analysis.curvature import (
    OPERATORS,
    CurvatureKind,
    CurvatureOperator,
    HessianOperator,
    MCFisherOperator,
    ParamLayout,
    as_dtype,
)
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.spectral import Eigenpairs, Which, hutchinson, hutchpp, lanczos, slq

if TYPE_CHECKING:
    from ckpt_analysis.types import Columns

TRACE_METHODS = ("hutchinson", "hutchpp")


@dataclass(frozen=True)
class CurvatureParams:
    """Options shared by the Hessian analyses: which loss, which parameters, which solver settings."""

    params: list[str] = field(default_factory=lambda: ["*"])
    operator: CurvatureKind = "hessian"
    dtype: Literal["float32", "float64"] = "float32"
    sample_sequences: int = 64
    cache_graph: bool = True
    which: Which = "largest_algebraic"
    tol: float = 1e-4
    max_iter: int = 200
    seed: int = 0


@dataclass(frozen=True)
class HessianParams(CurvatureParams):
    """``[analyses.hessian]`` options."""

    k: int = 10
    trace_probes: int = 60
    density: bool = False
    density_probes: int = 4
    density_steps: int = 40
    store_eigenvectors: bool = False


@dataclass(frozen=True)
class BasisParams(CurvatureParams):
    """``[analyses.hessian_basis]`` options."""

    k: int = 1
    every: int | None = None
    steps: list[int] = field(default_factory=list)
    random: bool = True
    axis: int = 50
    rayleigh: bool = False
    shuffled: bool = False
    """The POLCA paper's ablation (its Appendix E): Algorithm 1 again, over the basis checkpoints in
    a seeded random order (``basis_shuffled``)."""


SHUFFLED = "shuffled/"
"""Key prefix of the shuffled chain's units (``hessian_basis/shuffled/step=200``)."""


def link_variable(name: str, *, shuffled: bool) -> str:
    """The store name of one of :data:`LINK_VARIABLES` for the Hessian or the shuffled basis."""
    if not shuffled:
        return f"basis_{name}"
    return "basis_shuffled" if name == "vectors" else f"basis_shuffled_{name}"


def _operator(params: CurvatureParams, ctx: UnitContext, checkpoint: int) -> CurvatureOperator:
    """The ``operator`` (Hessian, GGN, empirical or sampled Fisher) of the mean scored-token loss over the
    first ``sample_sequences`` sequences of the job's ``[sample]``, else of its analysed data
    (docs/hessian.md, "Operators" and "The Hessian sample")."""
    model = as_dtype(ctx.load_model(checkpoint), params.dtype)
    layout = ParamLayout.from_model(model, params.params)
    sample = ctx.hessian_data.head(params.sample_sequences)
    size = batch_size(ctx, model, "backward", scale=2.0)  # docs/jobs.md, "Batch size": ×2
    if params.operator == HessianOperator.name:
        return HessianOperator(model, layout, sample, batch_size=size, cache_graph=params.cache_graph)
    if params.operator == MCFisherOperator.name:
        return MCFisherOperator(model, layout, sample, batch_size=size, seed=params.seed + checkpoint)
    return OPERATORS[params.operator](model, layout, sample, batch_size=size)


def _eigenpairs(
    params: HessianParams | BasisParams,
    op: CurvatureOperator,
    like: torch.Tensor,
    *,
    seed: int,
    deflate: torch.Tensor | None = None,
) -> Eigenpairs:
    """The top ``k`` pairs of ``op`` by Lanczos at the analysis' solver settings, flagged with the
    products' measured rounding (docs/hessian.md, "Eigenpairs" and "The measured floor")."""
    p = params
    return lanczos(
        op,
        op.n,
        p.k,
        like=like,
        which=p.which,
        tol=p.tol,
        max_iter=p.max_iter,
        seed=seed,
        deflate=deflate,
        rounding=op.rounding,
    )


C = TypeVar("C", bound=CurvatureParams)


class _Curvature(Analysis[C]):
    """What the two Hessian analyses share: the loss, the parameter layout, the solver options."""

    def _layout(self, ctx: PlanContext) -> ParamLayout:
        return ParamLayout.from_config(ctx.model_config, self.params.params)

    def tables(self, ctx: PlanContext) -> Columns:
        return self._layout(ctx).tables()


@register
class Hessian(_Curvature[HessianParams]):
    """Top-k eigenpairs (with residuals), Hutchinson and Hutch++ traces, optional SLQ density."""

    name = "hessian"

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        p = self.params
        coords = {"eig": np.arange(p.k), "trace_method": np.array(TRACE_METHODS, dtype=object)}
        if p.density:
            coords |= {"probe": np.arange(p.density_probes), "node": np.arange(p.density_steps)}
        return coords

    def variables(self, ctx: PlanContext) -> list[Variable]:
        p, s = self.params, len(ctx.checkpoints)
        per_eig, per_method = {"step": s, "eig": p.k}, {"step": s, "trace_method": len(TRACE_METHODS)}
        out = [
            Variable.of("hessian_eigval", per_eig, doc=f"top-k Ritz values of the {p.operator} operator"),
            Variable.of("hessian_residual", per_eig, doc="‖Hv − λv‖ per pair"),
            Variable.of("hessian_converged", per_eig, "int8", doc="residual within tol"),
            Variable.of("hessian_iterations", {"step": s}, "int64", doc="Lanczos steps"),
            Variable.of("hessian_loss", {"step": s}, doc="mean scored-token loss of the Hessian sample"),
            Variable.of("hessian_trace", per_method, doc=f"trace estimate of the {p.operator} operator"),
            Variable.of("hessian_trace_stderr", per_method, doc="standard error of the trace estimate"),
        ]
        if p.density:
            grid = {"step": s, "probe": p.density_probes, "node": p.density_steps}
            out += [
                Variable.of("hessian_slq_node", grid, doc="SLQ Ritz nodes"),
                Variable.of("hessian_slq_weight", grid, doc="SLQ weights (sum to 1 per probe)"),
            ]
        if p.store_eigenvectors:
            sizes = {"step": s, "eig": p.k, "param": self._layout(ctx).size}
            out.append(Variable.of("hessian_eigvec", sizes, p.dtype, unit_axes=2, doc="eigenvectors"))
        return out

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        p, i = self.params, unit.checkpoint
        op = _operator(p, ctx, i)
        like = op.flat_params()
        pairs = _eigenpairs(p, op, like, seed=p.seed)
        traces = [f(op, op.n, p.trace_probes, like=like, seed=p.seed) for f in (hutchinson, hutchpp)]
        writes = [
            Write("hessian_eigval", (i,), pairs.values),
            Write("hessian_residual", (i,), pairs.residuals),
            Write("hessian_converged", (i,), pairs.converged.astype(np.int8)),
            Write("hessian_iterations", (i,), np.array(pairs.iterations)),
            Write("hessian_loss", (i,), np.array(op.loss())),
            Write("hessian_trace", (i,), np.array([t[0] for t in traces])),
            Write("hessian_trace_stderr", (i,), np.array([t[1] for t in traces])),
        ]
        if p.density:
            nodes, weights = slq(op, op.n, p.density_probes, p.density_steps, like=like, seed=p.seed)
            writes += [Write("hessian_slq_node", (i,), nodes), Write("hessian_slq_weight", (i,), weights)]
        if p.store_eigenvectors:
            writes.append(Write("hessian_eigvec", (i,), pairs.vectors.cpu().numpy()))
        return writes


@register
class HessianBasis(_Curvature[BasisParams]):
    """POLCA Algorithm 1 as one dependent chain of units, plus random and axis-aligned bases.

    Link t takes the top-k eigenvectors of Π⊥ H_t Π⊥ (Π⊥ = I − BBᵀ, B = all earlier links'
    vectors), searching only range(Π⊥), and appends them to B (docs/hessian.md).
    """

    name = "hessian_basis"

    def _links(self, ctx: PlanContext | UnitContext) -> list[int]:
        """Indices (into the job's checkpoints) of the basis checkpoints, in step order."""
        steps = [c.step for c in ctx.checkpoints]
        if self.params.steps:
            return [steps.index(s) for s in sorted(self.params.steps)]
        every = self.params.every
        return [i for i, s in enumerate(steps) if every is None or s % every == 0]

    def _order(self, ctx: PlanContext | UnitContext, *, shuffled: bool) -> list[int]:
        """The basis checkpoints in the order the chain visits them (seeded permutation if shuffled)."""
        links = self._links(ctx)
        if not shuffled:
            return links
        return [links[i] for i in np.random.default_rng(self.params.seed).permutation(len(links))]

    def _size(self, ctx: PlanContext | UnitContext) -> int:
        return self.params.k * len(self._links(ctx))

    def vectors(self, ctx: PlanContext | UnitContext, *, axis: bool) -> int:
        """Vectors in the axis basis (``axis``), else in each of the others (k per link)."""
        return self.params.axis if axis else self._size(ctx)

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        coords = {"basis": np.arange(self._size(ctx))}
        if self.params.axis:
            coords["basis_axis"] = np.arange(self.params.axis)
        return coords

    def check(self, ctx: PlanContext) -> None:
        """``steps`` are among the job's checkpoints, ``every`` selects one, and the axis basis fits
        in the selected parameters."""
        steps = [c.step for c in ctx.checkpoints]
        absent = sorted(set(self.params.steps or []) - set(steps))
        if absent:
            raise JobSpecError(f"analyses.hessian_basis.steps {absent} are not among the job's checkpoints")
        if not self._links(ctx):
            raise JobSpecError(f"analyses.hessian_basis.every = {self.params.every} selects no checkpoint")
        n = self._layout(ctx).size
        if self.params.axis > n:
            raise JobSpecError(
                f"analyses.hessian_basis.axis = {self.params.axis} exceeds the {n} selected parameters"
            )

    def variables(self, ctx: PlanContext) -> list[Variable]:
        p, k, n = self.params, self._size(ctx), self._layout(ctx).size
        basis, axis = {"basis": k}, {"basis_axis": p.axis}
        out = self._link_variables(basis, n, shuffled=False)
        if p.shuffled:
            out += self._link_variables(basis, n, shuffled=True)
        if p.random:
            doc = "seeded random orthonormal basis (ablation)"
            out.append(Variable.of("basis_random", {**basis, "param": n}, p.dtype, doc=doc))
        if p.axis:
            doc = "unit vectors on the largest-|θ| parameters at the final checkpoint (LCA)"
            out += [
                Variable.of("basis_axis_vectors", {**axis, "param": n}, p.dtype, doc=doc),
                Variable.of("basis_axis_param", axis, "int64", doc="flat parameter index"),
            ]
        doc = "Rayleigh quotient bᵀHb at the last basis checkpoint"
        if p.rayleigh and p.random:
            out.append(Variable.of("basis_random_eigval", basis, doc=doc))
        if p.rayleigh and p.axis:
            out.append(Variable.of("basis_axis_eigval", axis, doc=doc))
        return out

    def _link_variables(self, basis: dict[str, int], n: int, *, shuffled: bool) -> list[Variable]:
        p = self.params
        v = functools.partial(link_variable, shuffled=shuffled)
        how = ", basis checkpoints in a shuffled order (ablation)" if shuffled else ""
        return [
            Variable.of(v("vectors"), {**basis, "param": n}, p.dtype, doc=f"Algorithm-1 basis vectors{how}"),
            Variable.of(v("step"), basis, "int64", doc="checkpoint step of origin"),
            Variable.of(v("eigval"), basis, doc=f"Ritz value of Π⊥CΠ⊥, C the {p.operator} operator"),
            Variable.of(v("residual"), basis, doc="‖Π⊥HΠ⊥v − λv‖"),
            Variable.of(v("converged"), basis, "int8", doc="residual within tol"),
        ]

    def units(self, ctx: PlanContext) -> list[Unit]:
        units = self._chain(ctx, shuffled=False)
        if self.params.shuffled:
            units += self._chain(ctx, shuffled=True)
        if self.params.random:
            units.append(Unit(self.name, "random"))
        if self.params.axis:
            units.append(Unit(self.name, "axis", checkpoint=len(ctx.checkpoints) - 1))
        return units

    def _chain(self, ctx: PlanContext, *, shuffled: bool) -> list[Unit]:
        """Algorithm 1 as a chain: each link depends on the one before it."""
        units: list[Unit] = []
        prefix = SHUFFLED if shuffled else ""
        for i in self._order(ctx, shuffled=shuffled):
            deps = (units[-1].id,) if units else ()
            units.append(Unit(self.name, f"{prefix}step={ctx.checkpoints[i].step}", checkpoint=i, deps=deps))
        return units

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        if unit.key == "random":
            return self._random(ctx)
        assert unit.checkpoint is not None
        if unit.key == "axis":
            return self._axis(ctx, unit.checkpoint)
        return self._link(ctx, unit.checkpoint, shuffled=unit.key.startswith(SHUFFLED))

    def _link(self, ctx: UnitContext, checkpoint: int, *, shuffled: bool) -> list[Write]:
        p = self.params
        v = functools.partial(link_variable, shuffled=shuffled)
        start = self._order(ctx, shuffled=shuffled).index(checkpoint) * p.k
        op = _operator(p, ctx, checkpoint)
        like = op.flat_params()
        previous = torch.from_numpy(ctx.read(v("vectors"))[:start]).to(like) if start else None
        if previous is not None and not torch.isfinite(previous).all():
            raise RuntimeError("earlier basis vectors are missing; their units must finish first")
        pairs = _eigenpairs(p, op, like, seed=p.seed + start, deflate=previous)
        rows = (slice(start, start + p.k),)
        return [
            Write(v("vectors"), rows, pairs.vectors.cpu().numpy()),
            Write(v("step"), rows, np.full(p.k, ctx.checkpoints[checkpoint].step)),
            Write(v("eigval"), rows, pairs.values),
            Write(v("residual"), rows, pairs.residuals),
            Write(v("converged"), rows, pairs.converged.astype(np.int8)),
        ]

    def _random(self, ctx: UnitContext) -> list[Write]:
        """A seeded Gaussian matrix orthonormalised by QR (float64), same size as the basis."""
        n = ParamLayout.from_config(ctx.model_config, self.params.params).size
        gen = torch.Generator().manual_seed(self.params.seed)
        q, _ = torch.linalg.qr(torch.randn(n, self._size(ctx), generator=gen, dtype=torch.float64))
        vectors = q.T.numpy().astype(self.params.dtype)
        return [Write("basis_random", (slice(None),), vectors), *self._rayleigh(ctx, "random", vectors)]

    def _axis(self, ctx: UnitContext, checkpoint: int) -> list[Write]:
        """Unit vectors on the ``axis`` parameters of largest |θ| at the last checkpoint (docs/hessian.md)."""
        model = ctx.load_model(checkpoint)
        layout = ParamLayout.from_model(model, self.params.params)
        theta = layout.flatten(model)
        index = torch.argsort(theta.abs(), descending=True, stable=True)[: self.params.axis].cpu().numpy()
        vectors = np.zeros((len(index), layout.size), dtype=self.params.dtype)
        vectors[np.arange(len(index)), index] = 1.0
        return [
            Write("basis_axis_vectors", (slice(None),), vectors),
            Write("basis_axis_param", (slice(None),), index),
            *self._rayleigh(ctx, "axis", vectors),
        ]

    def _rayleigh(self, ctx: UnitContext, basis: str, vectors: np.ndarray) -> list[Write]:
        """``paper`` λ_b (docs/polca.md) of another basis: bᵀHb at the last basis checkpoint, one HVP each."""
        if not self.params.rayleigh:
            return []
        op = _operator(self.params, ctx, self._links(ctx)[-1])
        like = op.flat_params()
        values = [float(v @ op(v)) for v in torch.from_numpy(vectors).to(like)]
        return [Write(f"basis_{basis}_eigval", (slice(None),), np.array(values))]
