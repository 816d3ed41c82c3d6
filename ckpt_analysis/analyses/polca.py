"""Exact per-token losses and POLCA: loss change allocated along a basis, per token (docs/polca.md)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from ckpt_analysis.analyses.hessian import HessianBasis
from ckpt_analysis.batching import batch_size, directional_pass
from ckpt_analysis.curvature import HessianOperator, ParamLayout, as_dtype
from ckpt_analysis.directional import directional_derivatives
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.losses import scored_token_losses
from ckpt_analysis.registry import (
    Analysis,
    PlanContext,
    Unit,
    UnitContext,
    Variable,
    Write,
    register,
)

SecondOrder = Literal["none", "exact", "paper", "trapezoid", "simpson"]
VARIANTS: tuple[SecondOrder, ...] = ("none", "exact", "paper", "trapezoid", "simpson")
BASIS_VARIABLES = {
    "hessian": ("basis_vectors", "basis"),
    "random": ("basis_random", "basis"),
    "axis": ("basis_axis_vectors", "basis_axis"),
    "shuffled": ("basis_shuffled", "basis"),
}
EIGVAL_VARIABLES = {
    "hessian": "basis_eigval",
    "random": "basis_random_eigval",
    "axis": "basis_axis_eigval",
    "shuffled": "basis_shuffled_eigval",
}
"""λ_b of the ``paper`` variant: Ritz values, or Rayleigh quotients for the other bases (docs/polca.md)."""
PAPER_GUARD = 1e-12
FINALIZE = "finalize"
"""Key of the unit that turns every checkpoint's projections into POLCA terms (``polca/finalize``)."""


# --- docs/polca.md formulas: arrays are P (C, K, N), D (C−1, K), c (C, K, N), Pmid (C−1, K, N). ---


def first_order(p: np.ndarray, d: np.ndarray) -> np.ndarray:
    """docs/polca.md: POLCA1[t,b,x] = P[t,b,x] · D[t,b], for t = 0 … C−2."""
    return np.asarray(p[:-1] * d[:, :, None])


def second_order_exact(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """docs/polca.md ``exact``: ½ · c[t,b,x] · D[t,b]²."""
    return np.asarray(0.5 * c[:-1] * (d**2)[:, :, None])


def second_order_paper(p: np.ndarray, d: np.ndarray, eigval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/polca.md ``paper``: ½ λ_b D² (P[t+1]−P[t]) / (Ḡ[t+1]−Ḡ[t]), Ḡ the token mean of P.

    Where |Ḡ[t+1] − Ḡ[t]| ≤ 1e-12 the term is 0; returns the term and, per b, how many such t.
    """
    g = p.mean(axis=2)
    dg = g[1:] - g[:-1]
    guarded = np.abs(dg) <= PAPER_GUARD
    scale = np.where(guarded, 0.0, 0.5 * eigval[None, :] * d**2 / np.where(guarded, 1.0, dg))
    return np.asarray(scale[:, :, None] * (p[1:] - p[:-1])), guarded.sum(axis=0)


def trapezoid_total(p: np.ndarray, d: np.ndarray) -> np.ndarray:
    """docs/polca.md ``trapezoid``: ½ (P[t] + P[t+1]) · D[t] replaces first + second order."""
    return np.asarray(0.5 * (p[:-1] + p[1:]) * d[:, :, None])


def simpson_total(p: np.ndarray, p_mid: np.ndarray, d: np.ndarray) -> np.ndarray:
    """docs/polca.md ``simpson``: (P[t] + 4 P[t+½] + P[t+1]) / 6 · D[t], P[t+½] at θ_t + ½Δθ_t."""
    return np.asarray((p[:-1] + 4 * p_mid + p[1:]) / 6 * d[:, :, None])


def projected_loss(polca: np.ndarray) -> np.ndarray:
    """docs/polca.md: L_b(x, t) = Σ_{i<t} POLCA[i,b,x], L_b(x, 0) = 0; shape (C, K, N)."""
    zero = np.zeros((1, *polca.shape[1:]), dtype=polca.dtype)
    return np.concatenate([zero, np.cumsum(polca, axis=0)])


def conservation_residual(token_loss: np.ndarray, polca: np.ndarray) -> np.ndarray:
    """docs/polca.md: r[t,x] = ℓ(x;θ_{t+1}) − ℓ(x;θ_t) − Σ_b POLCA[t,b,x]; shape (C−1, N)."""
    return np.asarray(np.diff(token_loss, axis=0) - polca.sum(axis=1))


def explained_fraction(token_loss: np.ndarray, polca: np.ndarray) -> tuple[np.ndarray, float]:
    """docs/polca.md: fraction of each token's and of the aggregate loss change (first → last) explained."""
    change = token_loss[-1] - token_loss[0]
    allocated = polca.sum(axis=(0, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_token = np.where(change != 0, allocated / change, np.nan)
    return per_token, float(allocated.sum() / change.sum())


def interval_changes(token_loss: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/polca.md, "Per-interval validity": per interval t, the exact change of the mean token
    loss, mean_x [ℓ(x;θ_{t+1}) − ℓ(x;θ_t)], and the change a variant predicts, mean_x Σ_b POLCA[t,b,x]."""
    return np.diff(token_loss, axis=0).mean(axis=1), total.sum(axis=1).mean(axis=1)


OPTIONAL_TERMS = {
    "first": ("polca_first", "first-order term P·D"),
    "second": ("polca_second", "second-order term of the chosen variant"),
    "terms": ("polca", "POLCA[t,b,x] of the chosen variant"),
}
"""``store`` options naming a (step, basis, token) term, derivable from ``proj_grad``,
``step_proj`` and ``projected_loss`` (docs/polca.md, "What is stored")."""

TAYLOR = ("first", "trapezoid")
"""Basis-free predictions of an interval's loss change from the full gradient (docs/polca.md,
"Per-interval validity"): ⟨g_t, Δθ_t⟩ and ½⟨g_t + g_{t+1}, Δθ_t⟩, g the mean token loss's gradient."""


def taylor_predictions(
    model: torch.nn.Module, following: torch.nn.Module, layout: ParamLayout, ctx: UnitContext
) -> np.ndarray:
    """:data:`TAYLOR` for the interval from ``model`` (θ_t) to ``following`` (θ_{t+1}), over the layout."""
    grads = [
        HessianOperator(
            m, layout, ctx.eval_data, batch_size=batch_size(ctx, m, "backward"), cache_graph=False
        ).gradient()
        for m in (model, following)
    ]
    step = layout.flatten(following) - layout.flatten(model)
    first = float(grads[0] @ step)
    return np.array([first, 0.5 * (first + float(grads[1] @ step))])


def filters(projected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/polca.md: keep b iff mean_x L_b(x, end) < 0; for kept b keep tokens with L_b(x, end) ≤ 0."""
    end = projected[-1]
    kept = end.mean(axis=1) < 0
    return kept, kept[:, None] & (end <= 0)


def _midpoint(here: torch.nn.Module, following: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model at θ_t + ½Δθ_t (docs/polca.md, ``simpson``): every parameter, not only the
    analysed subset, since P[t+1] is taken at the whole of θ_{t+1}."""
    after = dict(following.named_parameters())
    return {n: 0.5 * (p.detach() + after[n].detach()) for n, p in here.named_parameters()}


@contextmanager
def _matmul_tf32(enabled: bool) -> Iterator[None]:
    """docs/polca.md, "TF32": CUDA matmuls and convolutions in TF32 while the block runs (no
    effect off CUDA), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model``, detached: the point θ_{t+1} for a projection there."""
    return {n: p.detach() for n, p in model.named_parameters()}


def _stream(ctx: UnitContext, variable: str, per_pass: int) -> Iterator[np.ndarray]:
    """A stored basis, ``per_pass`` rows at a time, so no unit holds the whole basis (docs/polca.md)."""
    start = 0
    while len(rows := ctx.read(variable, slice(start, start + per_pass))):
        yield rows
        start += per_pass


# --- analyses ---


@dataclass(frozen=True)
class TokenLossParams:
    """``[analyses.token_loss]`` takes no options."""


@register
class TokenLoss(Analysis[TokenLossParams]):
    """``token_loss (step, token)``: each scored token's next-token cross-entropy (docs/jobs.md)."""

    name = "token_loss"

    def variables(self, ctx: PlanContext) -> list[Variable]:
        s, n = len(ctx.checkpoints), ctx.num_tokens
        return [Variable.of("token_loss", {"step": s, "token": n}, "float32", doc="exact per-token loss")]

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        model, data = ctx.load_model(unit.checkpoint), ctx.eval_data
        size = batch_size(ctx, model, "logits")
        device = next(model.parameters()).device
        parts = []
        with torch.no_grad():
            for batch in data.batches(size, device):
                parts.append(scored_token_losses(model, *batch).float().cpu())
        return [Write("token_loss", (unit.checkpoint,), torch.cat(parts).numpy())]


Basis = Literal["hessian", "random", "axis", "shuffled"]
Stored = Literal["terms", "first", "second", "taylor"]


def suffix(basis: str) -> str:
    """Variable-name suffix of a basis: ``""`` for the Hessian basis, ``"_random"``, ``"_axis"``."""
    return "" if basis == "hessian" else f"_{basis}"


@dataclass(frozen=True)
class PolcaParams:
    """``[analyses.polca]`` options."""

    bases: list[Basis] = field(default_factory=lambda: ["hessian"])
    second_order: SecondOrder = "trapezoid"
    """Chosen on conservation over 5 training seeds × 2 checkpoint spacings (docs/polca.md,
    "Second-order variants"; ``benchmarks/polca_variants.py``)."""
    measure_all_variants: bool | list[Basis] = False
    """``true``: compute c and the midpoints on every basis, so ``polca_explained`` reports every
    variant; a list: on those bases only (e.g. ``["hessian"]``, the cheap way to see them all)."""
    dtype: Literal["float32", "float64"] | None = None
    """``None``: the job's ``checkpoints.dtype`` (float32 where that is a half type)."""
    store: list[Stored] = field(default_factory=lambda: ["terms", "taylor"])
    """The optional variables written (docs/polca.md, "What is stored"): ``terms`` (``polca``),
    ``first`` (``polca_first``), ``second`` (``polca_second``), ``taylor`` (``taylor_change``,
    two full gradients per checkpoint). What the filters, clusters and conservation need is
    always written."""
    basis_memory_mb: float = 8192
    """Device memory the bases may hold for the life of a worker (docs/polca.md, "Cost"): a basis
    that fits is read once per worker and every checkpoint's directions go through one pass over
    the data; one that does not is streamed per checkpoint in groups of this size."""

    tf32: bool = False
    """TF32 matmuls for the projections on CUDA (docs/polca.md, "TF32"); off by default. Where on,
    every ``tf32_check_every``-th interval is also projected in fp32, and the conservation
    residual and explained fraction are reported both ways (``polca_tf32_*``)."""
    tf32_check_every: int = 10

    def __post_init__(self) -> None:
        if self.tf32_check_every < 1:
            raise JobSpecError(
                f"analyses.polca.tf32_check_every = {self.tf32_check_every} must be at least 1"
            )
        if self.tf32 and self.second_order in ("exact", "simpson"):
            raise JobSpecError(
                f"analyses.polca.tf32 checks conservation on first-order projections only; with "
                f"second_order = {self.second_order!r} set tf32 = false, or choose 'trapezoid' or 'paper'"
            )
        if len(set(self.store)) != len(self.store):
            raise JobSpecError(f"analyses.polca.store = {self.store} names an option twice")
        if self.basis_memory_mb <= 0:
            raise JobSpecError(f"analyses.polca.basis_memory_mb = {self.basis_memory_mb} must be positive")


@register
class Polca(Analysis[PolcaParams]):
    """Projections P, c (forward mode) and D per checkpoint, then POLCA terms in a finalize unit.

    Every basis in ``bases`` goes through the same pipeline; its variables carry its suffix
    (``projected_loss``, ``projected_loss_random``, ``projected_loss_axis`` — the last is LCA's
    per-parameter allocation). Needs ``[analyses.hessian_basis]`` (the bases and the parameter
    layout) and ``[analyses.token_loss]`` (for the conservation residual).
    """

    name = "polca"
    times_without_inputs = True  # the passes' cost depends on the basis's shape, not its values

    def requires(self) -> tuple[type[Analysis[Any]], ...]:
        return (HessianBasis, TokenLoss)

    def _needs(self, basis: str) -> tuple[bool, bool]:
        """Whether units compute c (exact) and midpoint projections (simpson) on ``basis``."""
        measured = self.params.measure_all_variants
        every = measured is True or (isinstance(measured, list) and basis in measured)
        return every or self.params.second_order == "exact", every or self.params.second_order == "simpson"

    @staticmethod
    def _basis(ctx: PlanContext | UnitContext) -> HessianBasis:
        """The job's ``hessian_basis`` analysis, its options parsed (defaults included)."""
        return HessianBasis.from_spec(ctx.job.analyses[HessianBasis.name])

    def _check(self, ctx: PlanContext | UnitContext) -> list[str]:
        """Validate the bases against hessian_basis; return its parameter patterns."""
        basis = self._basis(ctx).params
        if not self.params.bases or len(set(self.params.bases)) != len(self.params.bases):
            raise JobSpecError(
                "analyses.polca.bases must list distinct bases: 'hessian', 'random', 'axis', 'shuffled'"
            )
        if "random" in self.params.bases and not basis.random:
            raise JobSpecError("analyses.polca.bases has 'random' but hessian_basis.random = false")
        if "axis" in self.params.bases and not basis.axis:
            raise JobSpecError("analyses.polca.bases has 'axis' but hessian_basis.axis = 0")
        if "shuffled" in self.params.bases and not basis.shuffled:
            raise JobSpecError("analyses.polca.bases has 'shuffled' but hessian_basis.shuffled = false")
        measured = self.params.measure_all_variants
        stray = sorted(set(measured) - set(self.params.bases)) if isinstance(measured, list) else []
        if stray:
            raise JobSpecError(
                f"analyses.polca.measure_all_variants names {', '.join(map(repr, stray))}, not in "
                f"bases = {self.params.bases}"
            )
        rayleigh_needed = set(self.params.bases) - {"hessian", "shuffled"}  # the others have no Ritz values
        if self.params.second_order == "paper" and rayleigh_needed and not basis.rayleigh:
            raise JobSpecError(
                "second_order = 'paper' on the random or axis basis needs their λ_b: "
                "set hessian_basis.rayleigh = true (one HVP per vector)"
            )
        return list(basis.params)

    def sizes(self, ctx: PlanContext) -> dict[str, tuple[str, int]]:
        """Per basis: its dimension name and number of vectors."""
        coords = self._basis(ctx).coords(ctx)
        dims = {b: BASIS_VARIABLES[b][1] for b in self.params.bases}
        return {b: (dim, int(coords[dim].size)) for b, dim in dims.items()}

    def check(self, ctx: PlanContext) -> None:
        """The bases exist in ``hessian_basis`` and there is at least one interval."""
        self._check(ctx)
        if len(ctx.checkpoints) < 2:
            raise JobSpecError("analyses.polca needs at least two checkpoints")

    def variables(self, ctx: PlanContext) -> list[Variable]:
        s = {"step": len(ctx.checkpoints)}
        shared = [
            Variable.of("step_norm", s, doc="‖θ_{t+1} − θ_t‖ over the basis's parameters (last step NaN)"),
            Variable.of("polca_interval_change", s, unit_axes=0, doc="exact change of the mean token loss"),
        ]
        if "taylor" in self.params.store:
            shared.append(
                Variable.of(
                    "taylor_change",
                    {**s, "taylor": len(TAYLOR)},
                    doc="loss change predicted by the full gradient: ⟨g_t, Δθ⟩, ½⟨g_t + g_{t+1}, Δθ⟩",
                )
            )
        per_basis = [
            v for b, (dim, k) in self.sizes(ctx).items() for v in self._basis_variables(ctx, b, dim, k)
        ]
        return shared + per_basis

    def _basis_variables(self, ctx: PlanContext, basis: str, dim: str, k: int) -> list[Variable]:
        s, n, x = len(ctx.checkpoints), ctx.num_tokens, suffix(basis)
        grid, pairs = {"step": s, dim: k, "token": n}, {"step": s, "token": n}
        curv, mid = self._needs(basis)
        out = [
            Variable.of(f"proj_grad{x}", grid, "float32", doc="P[t,b,x] = ⟨b, ∇ℓ(x; θ_t)⟩"),
            Variable.of(f"step_proj{x}", {"step": s, dim: k}, doc="D[t,b] = ⟨b, θ_{t+1} − θ_t⟩"),
            *(
                Variable.of(f"{name}{x}", grid, "float32", doc=doc)
                for option, (name, doc) in OPTIONAL_TERMS.items()
                if option in self.params.store
            ),
            Variable.of(f"projected_loss{x}", grid, "float32", doc="L_b(x, t) = Σ_{i<t} POLCA[i,b,x]"),
            Variable.of(f"polca_residual{x}", pairs, "float32", doc="ℓ(θ_{t+1}) − ℓ(θ_t) − Σ_b POLCA"),
            Variable.of(
                f"polca_explained_token{x}",
                {"token": n},
                "float32",
                unit_axes=0,
                doc="fraction of each token's loss change the basis explains",
            ),
            Variable.of(
                f"polca_explained{x}",
                {"variant": len(VARIANTS)},
                unit_axes=0,
                doc="fraction of the aggregate loss change explained, per variant (NaN: not computed)",
            ),
            Variable.of(
                f"polca_paper_guarded{x}",
                {dim: k},
                "int64",
                unit_axes=0,
                doc="paper variant: step pairs with |ΔḠ| ≤ 1e-12 (term set to 0)",
            ),
            Variable.of(
                f"polca_interval_predicted{x}",
                {"step": s, "variant": len(VARIANTS)},
                unit_axes=0,
                doc="change of the mean token loss over [t, t+1] each variant predicts (NaN: not computed)",
            ),
            Variable.of(f"basis_kept{x}", {dim: k}, "int8", unit_axes=0, doc="mean L_b(x, end) < 0"),
            Variable.of(f"token_kept{x}", {dim: k, "token": n}, "int8", doc="L_b(x, end) ≤ 0"),
        ]
        if self.params.tf32:
            checks = {"tf32_check": len(self.checked(len(ctx.checkpoints)))}
            out += [
                Variable.of(
                    f"proj_grad_fp32{x}",
                    {**checks, "endpoint": 2, dim: k, "token": n},
                    "float32",
                    doc="P at θ_t and θ_{t+1} of each checked interval, projected in fp32",
                ),
                Variable.of(
                    f"polca_tf32_residual{x}",
                    {**checks, "precision": 2},
                    unit_axes=0,
                    doc="mean |conservation residual| of each checked interval, TF32 and fp32",
                ),
                Variable.of(
                    f"polca_tf32_explained{x}",
                    {"precision": 2},
                    unit_axes=0,
                    doc="fraction of the checked intervals' loss change explained, TF32 and fp32",
                ),
            ]
        if curv:
            out.append(Variable.of(f"proj_curv{x}", grid, "float32", doc="c[t,b,x] = bᵀ∇²ℓ(x; θ_t) b"))
        if mid:
            doc = "P at θ_t + ½Δθ_t (last step: unused)"
            out.append(Variable.of(f"proj_grad_mid{x}", grid, "float32", doc=doc))
        return out

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        coords = {"variant": np.array(VARIANTS, dtype=object), "taylor": np.array(TAYLOR, dtype=object)}
        if self.params.tf32:
            steps = np.array([c.step for c in ctx.checkpoints])
            coords |= {
                "tf32_check": steps[self.checked(len(steps))],
                "endpoint": np.array(["t", "t+1"], dtype=object),
                "precision": np.array(["tf32", "fp32"], dtype=object),
            }
        return coords

    def checked(self, checkpoints: int) -> list[int]:
        """docs/polca.md, "TF32": the intervals [t, t+1] also projected in fp32."""
        return list(range(0, checkpoints - 1, self.params.tf32_check_every))

    def units(self, ctx: PlanContext) -> list[Unit]:
        basis = self._basis(ctx)
        deps = tuple(u.id for u in basis.units(ctx))
        per_step = [Unit(u.analysis, u.key, u.checkpoint, deps) for u in super().units(ctx)]
        losses = tuple(u.id for u in TokenLoss.from_spec({}).units(ctx))
        return [*per_step, Unit(self.name, FINALIZE, None, (*(u.id for u in per_step), *losses))]

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        if unit.checkpoint is None:
            loss = ctx.read("token_loss").astype(np.float64)
            return [w for b in self.params.bases for w in self._finalize(ctx, b, loss)]
        return self._project(ctx, unit.checkpoint)

    def _dtype(self, ctx: UnitContext) -> Literal["float32", "float64"]:
        """``dtype``, else the job's checkpoint dtype; half types compute in float32."""
        if self.params.dtype is not None:
            return self.params.dtype
        return "float64" if ctx.job.checkpoints.dtype == "float64" else "float32"

    def _project(self, ctx: UnitContext, t: int) -> list[Write]:
        patterns = self._check(ctx)
        last = t + 1 == len(ctx.checkpoints)
        dtype = self._dtype(ctx)
        model = as_dtype(ctx.load_model(t), dtype)  # the previous checkpoint's unit left θ_t cached
        following = None if last else as_dtype(ctx.load_model(t + 1), dtype)  # cached for the next
        layout = ParamLayout.from_model(model, patterns)
        theta_next = None if following is None else layout.flatten(following)
        theta = layout.flatten(model)
        size, per_pass = directional_pass(ctx, model, max(self._rows(ctx, b) for b in self.params.bases))
        project = partial(
            directional_derivatives, model, layout, ctx.eval_data, batch_size=size, vectors_per_pass=per_pass
        )
        step = None if theta_next is None else theta_next - theta
        mid = any(self._needs(b)[1] for b in self.params.bases)
        midpoint = _midpoint(model, following) if mid and following is not None else None
        parts: dict[str, list[np.ndarray]] = {}
        checked = self.checked(len(ctx.checkpoints)) if self.params.tf32 else []
        checks: dict[str, list[np.ndarray]] = {}
        for name in self.params.bases:
            x, (curv, at_midpoint) = suffix(name), self._needs(name)
            for chunk in self._directions(ctx, name, theta):
                with _matmul_tf32(self.params.tf32):
                    here = project(chunk, second=curv)
                if t in checked and following is not None:  # the same pair in fp32 (docs/polca.md, "TF32")
                    pair = [project(chunk).first, project(chunk, params=_parameters(following)).first]
                    checks.setdefault(f"proj_grad_fp32{x}", []).append(torch.stack(pair).cpu().numpy())
                parts.setdefault(f"proj_grad{x}", []).append(here.first.cpu().numpy())
                if here.second is not None:
                    parts.setdefault(f"proj_curv{x}", []).append(here.second.cpu().numpy())
                if step is not None:
                    parts.setdefault(f"step_proj{x}", []).append((chunk @ step).cpu().numpy())
                if midpoint is not None and at_midpoint:
                    at_mid = project(chunk, params=midpoint).first
                    parts.setdefault(f"proj_grad_mid{x}", []).append(at_mid.cpu().numpy())
        norm = np.array(np.nan if step is None else float(step.norm()))
        position = (checked.index(t),) if checks else ()
        writes = [
            Write("step_norm", (t,), norm),
            *(Write(v, (t,), np.concatenate(b)) for v, b in parts.items()),
            *(Write(v, position, np.concatenate(b, axis=1)) for v, b in checks.items()),
        ]
        if "taylor" in self.params.store:
            taylor = (
                np.full(len(TAYLOR), np.nan)
                if following is None
                else taylor_predictions(model, following, layout, ctx)
            )
            writes.append(Write("taylor_change", (t,), taylor))
        return writes

    def _rows(self, ctx: UnitContext, basis: str) -> int:
        """How many vectors ``basis`` has."""
        return self._basis(ctx).vectors(ctx, axis=basis == "axis")

    def _directions(self, ctx: UnitContext, basis: str, like: torch.Tensor) -> Iterator[torch.Tensor]:
        """docs/polca.md, "Cost": the stored ``basis`` on ``like``'s device and dtype. Within
        ``basis_memory_mb`` (with the bases this worker keeps already) it is read once per
        worker and kept in ``ctx.kept`` for later checkpoints; otherwise it is streamed, as many
        rows at a time as the budget holds."""
        key = f"polca/basis/{basis}/{like.dtype}/{like.device}"
        if key in ctx.kept:
            yield ctx.kept[key]
            return
        row_bytes = like.numel() * like.element_size()
        held = sum(v.numel() * v.element_size() for k, v in ctx.kept.items() if k.startswith("polca/basis/"))
        budget = self.params.basis_memory_mb * 2**20
        if self._rows(ctx, basis) * row_bytes <= budget - held:
            whole = torch.from_numpy(ctx.read(BASIS_VARIABLES[basis][0])).to(like)
            ctx.kept[key] = whole
            yield whole
            return
        for rows in _stream(ctx, BASIS_VARIABLES[basis][0], max(1, int(budget // row_bytes))):
            yield torch.from_numpy(rows).to(like)

    def _eigval(self, ctx: UnitContext, basis: str) -> np.ndarray | None:
        """λ_b of the ``paper`` variant where the basis has them (docs/polca.md), else None."""
        has = basis == "hessian" or self._basis(ctx).params.rayleigh
        return ctx.read(EIGVAL_VARIABLES[basis]) if has else None

    @staticmethod
    def _first_order_totals(
        p: np.ndarray, d: np.ndarray, eigval: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The variants computed from P and D alone (``none``, ``trapezoid``, and ``paper`` where
        λ_b exists), and per b the paper variant's guarded step pairs."""
        first = first_order(p, d)
        totals: dict[str, np.ndarray] = {"none": first, "trapezoid": trapezoid_total(p, d)}
        guarded = np.zeros(p.shape[1], dtype=np.int64)
        if eigval is not None:
            paper, guarded = second_order_paper(p, d, eigval)
            totals["paper"] = first + paper
        return totals, guarded

    def _tf32_check(
        self,
        ctx: UnitContext,
        basis: str,
        loss: np.ndarray,
        chosen: np.ndarray,
        d: np.ndarray,
        eigval: np.ndarray | None,
    ) -> list[Write]:
        """docs/polca.md, "TF32": each checked interval's conservation residual (mean |r|) and the
        checked intervals' explained fraction, from the TF32 projections (the chosen variant's
        terms, ``chosen``) and from the fp32 ones."""
        fp32 = ctx.read(f"proj_grad_fp32{suffix(basis)}").astype(np.float64)  # (checks, 2, K, N)
        checked = self.checked(len(loss))
        totals = [
            (
                chosen[t : t + 1],
                self._first_order_totals(fp32[i], d[t : t + 1], eigval)[0][self.params.second_order],
            )
            for i, t in enumerate(checked)
        ]
        pairs = [loss[t : t + 2] for t in checked]
        residuals = [
            [float(np.abs(conservation_residual(pair, total)).mean()) for total in both]
            for pair, both in zip(pairs, totals, strict=True)
        ]
        allocated = np.array([sum(float(both[j].sum()) for both in totals) for j in range(2)])
        change = sum(float(np.diff(pair, axis=0).sum()) for pair in pairs)
        everything = (slice(None),)
        x = suffix(basis)
        return [
            Write(f"polca_tf32_residual{x}", everything, np.array(residuals)),
            Write(f"polca_tf32_explained{x}", everything, allocated / change),
        ]

    def _finalize(self, ctx: UnitContext, basis: str, loss: np.ndarray) -> list[Write]:
        curv, mid = self._needs(basis)
        x = suffix(basis)
        p = ctx.read(f"proj_grad{x}").astype(np.float64)
        d = ctx.read(f"step_proj{x}")[:-1]
        eigval = self._eigval(ctx, basis)
        totals, guarded = self._first_order_totals(p, d, eigval)
        first = totals["none"]
        if curv:
            totals["exact"] = first + second_order_exact(ctx.read(f"proj_curv{x}").astype(np.float64), d)
        if mid:
            totals["simpson"] = simpson_total(p, ctx.read(f"proj_grad_mid{x}")[:-1].astype(np.float64), d)
        chosen = totals[self.params.second_order]
        projected = projected_loss(chosen)
        fractions = {v: explained_fraction(loss, total) for v, total in totals.items()}
        per_token = fractions[self.params.second_order][0]
        kept, tokens = filters(projected)
        explained = [fractions[v][1] if v in fractions else np.nan for v in VARIANTS]
        change = interval_changes(loss, first)[0]
        predicted = np.full((len(change) + 1, len(VARIANTS)), np.nan)
        for v, total in totals.items():
            predicted[:-1, VARIANTS.index(v)] = interval_changes(loss, total)[1]

        def padded(values: np.ndarray) -> np.ndarray:  # step pairs → steps (last step NaN)
            return np.concatenate([values, np.full((1, *values.shape[1:]), np.nan)]).astype(np.float32)

        everything = (slice(None),)
        terms = {"first": first, "second": chosen - first, "terms": chosen}
        return [
            *(
                Write(f"{OPTIONAL_TERMS[o][0]}{x}", everything, padded(terms[o]))
                for o in OPTIONAL_TERMS
                if o in self.params.store
            ),
            Write(f"projected_loss{x}", everything, projected.astype(np.float32)),
            Write(f"polca_residual{x}", everything, padded(conservation_residual(loss, chosen))),
            Write(f"polca_explained_token{x}", everything, per_token.astype(np.float32)),
            Write(f"polca_explained{x}", everything, np.array(explained)),
            Write(f"polca_interval_predicted{x}", everything, predicted),
            Write("polca_interval_change", everything, padded(change)),
            Write(f"polca_paper_guarded{x}", everything, guarded),
            Write(f"basis_kept{x}", everything, kept.astype(np.int8)),
            Write(f"token_kept{x}", everything, tokens.astype(np.int8)),
            *(self._tf32_check(ctx, basis, loss, chosen, d, eigval) if self.params.tf32 else []),
        ]
