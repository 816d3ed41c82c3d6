"""Hessian eigenpairs, trace and density per checkpoint, and POLCA's iterative basis (docs/hessian.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ckpt_analysis.curvature import HessianOperator, ParamLayout, as_dtype
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.spectral import Which, hutchinson, hutchpp, lanczos, slq

TRACE_METHODS = ("hutchinson", "hutchpp")


@dataclass(frozen=True)
class CurvatureParams:
    """Options shared by the Hessian analyses: which loss, which parameters, which solver settings."""

    params: list[str] = field(default_factory=lambda: ["*"])
    dtype: Literal["float32", "float64"] = "float32"
    sample_sequences: int = 64
    which: Which = "largest_algebraic"
    tol: float = 1e-5
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


def _operator(params: CurvatureParams, ctx: UnitContext, checkpoint: int) -> HessianOperator:
    """The Hessian of the mean scored-token loss over the first ``sample_sequences`` sequences of the
    job's ``[sample]`` (docs/hessian.md, "Options"), else of its analysed data."""
    model = as_dtype(ctx.load_model(checkpoint), params.dtype)
    layout = ParamLayout.from_model(model, params.params)
    sample = ctx.hessian_data.head(params.sample_sequences)
    return HessianOperator(model, layout, sample, batch_size=ctx.job.compute.batch_size)


class _Curvature(Analysis):
    params: CurvatureParams

    def _layout(self, ctx: PlanContext) -> ParamLayout:
        return ParamLayout.from_config(ctx.model_config, self.params.params)

    def tables(self, ctx: PlanContext) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        return self._layout(ctx).tables()


@register
class Hessian(_Curvature):
    """Top-k eigenpairs (with residuals), Hutchinson and Hutch++ traces, optional SLQ density."""

    name = "hessian"
    Params = HessianParams
    params: HessianParams

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        p = self.params
        coords = {"eig": np.arange(p.k), "trace_method": np.array(TRACE_METHODS, dtype=object)}
        if p.density:
            coords |= {"probe": np.arange(p.density_probes), "node": np.arange(p.density_steps)}
        return coords

    def variables(self, ctx: PlanContext) -> list[Variable]:
        p, s = self.params, len(ctx.checkpoints)
        per_eig = (("step", "eig"), (s, p.k), "float64", (1, p.k))
        per_method = (("step", "trace_method"), (s, 2), "float64", (1, 2))
        scalar = (("step",), (s,), "float64", (1,))
        out = [
            Variable("hessian_eigval", *per_eig, doc="top-k Ritz values"),
            Variable("hessian_residual", *per_eig, doc="‖Hv − λv‖ per pair"),
            Variable("hessian_converged", ("step", "eig"), (s, p.k), "int8", (1, p.k), fill=-1),
            Variable("hessian_iterations", ("step",), (s,), "int64", (1,), fill=-1, doc="Lanczos steps"),
            Variable("hessian_loss", *scalar, doc="mean scored-token loss of the Hessian sample"),
            Variable("hessian_trace", *per_method, doc="trace estimate"),
            Variable("hessian_trace_stderr", *per_method, doc="standard error of the trace estimate"),
        ]
        if p.density:
            grid = (
                ("step", "probe", "node"),
                (s, p.density_probes, p.density_steps),
                "float64",
                (1, p.density_probes, p.density_steps),
            )
            out += [
                Variable("hessian_slq_node", *grid, doc="SLQ Ritz nodes"),
                Variable("hessian_slq_weight", *grid, doc="SLQ weights (sum to 1 per probe)"),
            ]
        if p.store_eigenvectors:
            n = self._layout(ctx).size
            out.append(Variable("hessian_eigvec", ("step", "eig", "param"), (s, p.k, n), p.dtype, (1, 1, n)))
        return out

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        p, i = self.params, unit.checkpoint
        op = _operator(p, ctx, i)
        like = op.flat_params()
        pairs = lanczos(op, op.n, p.k, like=like, which=p.which, tol=p.tol, max_iter=p.max_iter, seed=p.seed)
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
class HessianBasis(_Curvature):
    """POLCA Algorithm 1 as one dependent chain of units, plus random and axis-aligned bases.

    Link t takes the top-k eigenvectors of Π⊥ H_t Π⊥ (Π⊥ = I − BBᵀ, B = all earlier links'
    vectors), searching only range(Π⊥), and appends them to B (docs/hessian.md).
    """

    name = "hessian_basis"
    Params = BasisParams
    params: BasisParams

    def _links(self, ctx: PlanContext | UnitContext) -> list[int]:
        """Indices (into the job's checkpoints) of the basis checkpoints, in step order."""
        steps = [c.step for c in ctx.checkpoints]
        if self.params.steps:
            absent = sorted(set(self.params.steps) - set(steps))
            if absent:
                raise JobSpecError(
                    f"analyses.hessian_basis.steps {absent} are not among the job's checkpoints"
                )
            return [steps.index(s) for s in sorted(self.params.steps)]
        every = self.params.every
        links = [i for i, s in enumerate(steps) if every is None or s % every == 0]
        if not links:
            raise JobSpecError(f"analyses.hessian_basis.every = {every} selects no checkpoint")
        return links

    def _size(self, ctx: PlanContext | UnitContext) -> int:
        return self.params.k * len(self._links(ctx))

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        coords = {"basis": np.arange(self._size(ctx))}
        if self.params.axis:
            coords["basis_axis"] = np.arange(self.params.axis)
        return coords

    def variables(self, ctx: PlanContext) -> list[Variable]:
        p, k, n = self.params, self._size(ctx), self._layout(ctx).size
        if p.axis > n:
            raise JobSpecError(f"analyses.hessian_basis.axis = {p.axis} exceeds the {n} selected parameters")
        per_vector = (("basis",), (k,), "float64", (1,))
        out = [
            Variable(
                "basis_vectors", ("basis", "param"), (k, n), p.dtype, (1, n), doc="Algorithm-1 basis vectors"
            ),
            Variable("basis_step", ("basis",), (k,), "int64", (1,), fill=-1, doc="checkpoint step of origin"),
            Variable("basis_eigval", *per_vector, doc="Ritz value of Π⊥HΠ⊥"),
            Variable("basis_residual", *per_vector, doc="‖Π⊥HΠ⊥v − λv‖"),
            Variable("basis_converged", ("basis",), (k,), "int8", (1,), fill=-1),
        ]
        if p.random:
            out.append(
                Variable(
                    "basis_random",
                    ("basis", "param"),
                    (k, n),
                    p.dtype,
                    (1, n),
                    doc="seeded random orthonormal basis (ablation)",
                )
            )
        if p.axis:
            out += [
                Variable(
                    "basis_axis_vectors",
                    ("basis_axis", "param"),
                    (p.axis, n),
                    p.dtype,
                    (1, n),
                    doc="unit vectors on the largest-|θ| parameters at the final checkpoint (LCA)",
                ),
                Variable("basis_axis_param", ("basis_axis",), (p.axis,), "int64", (1,), fill=-1),
            ]
        doc = "Rayleigh quotient bᵀHb at the last basis checkpoint"
        if p.rayleigh and p.random:
            out.append(Variable("basis_random_eigval", *per_vector, doc=doc))
        if p.rayleigh and p.axis:
            out.append(Variable("basis_axis_eigval", ("basis_axis",), (p.axis,), "float64", (1,), doc=doc))
        return out

    def units(self, ctx: PlanContext) -> list[Unit]:
        units: list[Unit] = []
        for i in self._links(ctx):
            deps = (units[-1].id,) if units else ()
            units.append(Unit(self.name, f"step={ctx.checkpoints[i].step}", checkpoint=i, deps=deps))
        if self.params.random:
            units.append(Unit(self.name, "random"))
        if self.params.axis:
            units.append(Unit(self.name, "axis", checkpoint=len(ctx.checkpoints) - 1))
        return units

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        if unit.key == "random":
            return self._random(ctx)
        assert unit.checkpoint is not None
        if unit.key == "axis":
            return self._axis(ctx, unit.checkpoint)
        return self._link(ctx, unit.checkpoint)

    def _link(self, ctx: UnitContext, checkpoint: int) -> list[Write]:
        p = self.params
        start = self._links(ctx).index(checkpoint) * p.k
        op = _operator(p, ctx, checkpoint)
        like = op.flat_params()
        previous = torch.from_numpy(ctx.read("basis_vectors")[:start]).to(like) if start else None
        if previous is not None and not torch.isfinite(previous).all():
            raise RuntimeError("earlier basis vectors are missing; their units must finish first")
        pairs = lanczos(
            op,
            op.n,
            p.k,
            like=like,
            which=p.which,
            tol=p.tol,
            max_iter=p.max_iter,
            seed=p.seed + start,
            deflate=previous,
        )
        rows = (slice(start, start + p.k),)
        return [
            Write("basis_vectors", rows, pairs.vectors.cpu().numpy()),
            Write("basis_step", rows, np.full(p.k, ctx.checkpoints[checkpoint].step)),
            Write("basis_eigval", rows, pairs.values),
            Write("basis_residual", rows, pairs.residuals),
            Write("basis_converged", rows, pairs.converged.astype(np.int8)),
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
