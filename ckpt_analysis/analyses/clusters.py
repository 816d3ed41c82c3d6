"""Clusters of per-token trajectories, breakthroughs, hidden breakthroughs, label scores (docs/polca.md)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from ckpt_analysis.analyses.polca import FINALIZE, Polca, TokenLoss, filters, suffix
from ckpt_analysis.config import require_distinct
from ckpt_analysis.data import label_names, label_variable
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.registry import (
    Analysis,
    PlanContext,
    Unit,
    UnitContext,
    Variable,
    Write,
    register,
)

Trajectory = Literal[
    "polca", "polca_random", "polca_axis", "polca_shuffled", "exact_loss", "loss_change", "fisher"
]
PROJECTED = {
    "polca": "hessian",
    "polca_random": "random",
    "polca_axis": "axis",
    "polca_shuffled": "shuffled",
    "fisher": "hessian",
}
"""Trajectory types read from POLCA outputs, and the basis each needs (``polca_axis`` is LCA)."""
FILTERED, OUTLIER = -2, -1
TOP = 3

log = logging.getLogger(__name__)


# --- docs/polca.md formulas ---


def step_grid(steps: np.ndarray) -> np.ndarray:
    """The uniform grid over ``steps`` at their finest spacing."""
    spacing = int(np.diff(steps).min()) if len(steps) > 1 else 1
    return np.arange(steps[0], steps[-1] + 1, spacing)


def lag_shift(grid: np.ndarray, lag: int) -> int:
    """Δ in points of the uniform ``grid`` (at least 1); ValueError if no point lies Δ from both ends."""
    spacing = int(grid[1] - grid[0]) if len(grid) > 1 else 1
    shift = max(1, round(lag / spacing))
    if len(grid) <= 2 * shift:
        raise ValueError(f"lag {lag} leaves no step inside a trajectory of {grid[-1] - grid[0]} steps")
    return shift


def uniform_grid(steps: np.ndarray, curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Curves (…, C) at ``steps`` linearly interpolated onto a uniform grid at the finest spacing."""
    grid = step_grid(steps)
    flat = curves.reshape(-1, curves.shape[-1])
    out = np.stack([np.interp(grid, steps, row) for row in flat]) if len(flat) else flat
    return grid, out.reshape(*curves.shape[:-1], len(grid))


def breakthrough_steps(
    grid: np.ndarray, curves: np.ndarray, lag: int, convention: Literal["acceleration", "paper"]
) -> np.ndarray:
    """Breakthrough step of each curve (rows of ``curves`` on the uniform ``grid``), lag Δ in steps.

    docs/polca.md ``acceleration``: the onset of the largest acceleration of the fall,
    argmax_t [(f(t) − f(t+Δ)) − (f(t−Δ) − f(t))]; ``paper``: argmax_t of the plain second
    difference [f(t+Δ) − f(t)] − [f(t) − f(t−Δ)]; t ∈ [Δ, end − Δ].
    """
    shift = lag_shift(grid, lag)
    centre = curves[:, shift:-shift]
    second = curves[:, 2 * shift :] - 2 * centre + curves[:, : -2 * shift]
    score = -second if convention == "acceleration" else second
    return np.asarray(grid[shift:-shift][np.argmax(score, axis=1)])


def default_tau(steps: np.ndarray, mean_loss: np.ndarray, fraction: float = 0.9) -> float:
    """docs/polca.md: the first step by which the mean exact loss made 90 % of its total decrease."""
    drop = mean_loss[0] - mean_loss[-1]
    reached = np.nonzero(mean_loss[0] - mean_loss >= fraction * drop)[0]
    return float(steps[reached[0]])


def normalise(curves: np.ndarray, mode: Literal["none", "zscore", "range"]) -> np.ndarray:
    """Per-curve normalisation before clustering (beyond the paper, which clusters raw curves):
    ``zscore`` compares shapes whatever their scale; ``range`` maps each curve onto [0, 1]."""
    if mode == "none":
        return curves
    low = curves.mean(axis=-1, keepdims=True) if mode == "zscore" else curves.min(axis=-1, keepdims=True)
    spread = (
        curves.std(axis=-1, keepdims=True) if mode == "zscore" else np.ptp(curves, axis=-1, keepdims=True)
    )
    return np.asarray((curves - low) / np.where(spread > 0, spread, 1.0))


MIN_CLUSTERED = 3
"""Fewer curves than this are all outliers: HDBSCAN needs min_cluster_size ≥ 2 plus one more point
to tell a cluster from noise."""


DENSE_DISTANCES_BYTES = 2**30
"""HDBSCAN's ``generic`` algorithm (the dense n × n distance matrix, computed by BLAS) up to this
many bytes of it, about 11,500 curves; above, its tree-based ``best``. The same minimum spanning
tree, so the same labels: 5.4× faster on 5,000 curves of 501 points (docs/benchmarks.md,
"Clusters at the paper's size")."""


@contextmanager
def _fitting_threads(threads: int) -> Iterator[ThreadPoolExecutor]:
    """docs/polca.md, "Clusters": a unit's vectors are clustered ``compute.torch_threads`` at a
    time, each fit's BLAS on one thread (HDBSCAN's distance and tree work release the GIL)."""
    with ThreadPoolExecutor(max_workers=threads) as pool, threadpool_limits(1 if threads > 1 else None):
        yield pool


def hdbscan_labels(
    curves: np.ndarray, *, min_cluster_fraction: float, min_samples_fraction: float
) -> np.ndarray:
    """HDBSCAN labels (−1: outlier) with min_cluster_size = fraction · n, min_samples = fraction · n."""
    import hdbscan

    n = len(curves)
    if n < MIN_CLUSTERED:
        return np.full(n, OUTLIER)
    size = max(2, round(min_cluster_fraction * n))
    samples = max(1, round(min_samples_fraction * n))
    algorithm = "generic" if n * n * 8 <= DENSE_DISTANCES_BYTES else "best"
    fit = hdbscan.HDBSCAN(min_cluster_size=size, min_samples=samples, algorithm=algorithm)
    return np.asarray(fit.fit_predict(np.asarray(curves, dtype=np.float64)))


def label_scores(labels: np.ndarray, has_label: np.ndarray, cluster: int) -> tuple[float, float, float]:
    """docs/polca.md: homogeneity (share of the cluster with the label), recall (share of the
    non-outlier labelled tokens inside the cluster) and their F1."""
    members = labels == cluster
    labelled = has_label & (labels >= 0)
    homogeneity = float(has_label[members].mean()) if members.any() else 0.0
    recall = float((members & has_label).sum() / labelled.sum()) if labelled.any() else 0.0
    f1 = 2 * homogeneity * recall / (homogeneity + recall) if homogeneity + recall else 0.0
    return homogeneity, recall, f1


def label_auc(values: np.ndarray, has_label: np.ndarray) -> float:
    """Area under the ROC curve of ``values`` ranking labelled tokens above the rest (ties ½).

    A threshold-free check of whether one vector's trajectories carry the label at all, apart
    from how HDBSCAN groups them (not in the paper): Mann–Whitney U / (n₊ n₋); NaN without both.
    """
    positives, negatives = int(has_label.sum()), int((~has_label).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(values)
    return float((ranks[has_label].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _curve_auc(curves: np.ndarray, has_label: np.ndarray, allowed: np.ndarray | None) -> float:
    """:func:`label_auc` of each curve's total change (last − first), over the allowed tokens."""
    population = np.ones(len(curves), dtype=bool) if allowed is None else allowed
    return label_auc(curves[population, -1] - curves[population, 0], has_label[population])


def passes_restriction(
    members: np.ndarray, has_label: np.ndarray, allowed: np.ndarray, fraction: float
) -> bool:
    """docs/polca.md (paper protocol): a cluster is scored only if more than ``fraction`` of its labelled
    tokens are ``allowed`` (for carry: in the 10s or 100s place; the 1000s carry is trivial)."""
    labelled = members & has_label
    return bool(labelled.any() and allowed[labelled].mean() > fraction)


def medoid(curves: np.ndarray, members: np.ndarray) -> int:
    """Index (into ``curves``) of the member with the least total distance to the others."""
    idx = np.nonzero(members)[0]
    points = curves[idx]
    distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).sum(1)
    return int(idx[np.argmin(distance)])


def trajectory_curves(
    kind: str, read: Callable[[str], np.ndarray], span: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray]:
    """The curves (vector, token, step) a trajectory type clusters over the checkpoints ``span``, and
    which tokens are kept.

    docs/polca.md, "Windows": projected losses are re-summed from the span's first checkpoint,
    L_b(x, t) − L_b(x, t₀), and the filters are applied at its last; the other curves are sliced.
    """
    loss = read("token_loss").astype(np.float64)[span]
    if kind == "exact_loss":
        return loss.T[None], np.ones((1, loss.shape[1]), dtype=bool)
    if kind == "loss_change":
        return np.diff(loss, axis=0).T[None], np.ones((1, loss.shape[1]), dtype=bool)
    if kind == "fisher":
        fisher = read("proj_grad").astype(np.float64)[span] ** 2  # docs/polca.md baseline: P[t,b,x]²
        return fisher.transpose(1, 2, 0), np.ones(fisher.shape[1:], dtype=bool)
    projected = read(f"projected_loss{suffix(PROJECTED[kind])}").astype(np.float64)[span]  # (C, K, N)
    projected = projected - projected[:1]
    return projected.transpose(1, 2, 0), filters(projected)[1]


def _onsets(
    grid: np.ndarray, curves: np.ndarray, lag: int, convention: Literal["acceleration", "paper"]
) -> np.ndarray:
    """:func:`breakthrough_steps`, NaN for every curve of a window shorter than 2·lag."""
    try:
        return breakthrough_steps(grid, curves, lag, convention).astype(np.float64)
    except ValueError:
        return np.full(len(curves), np.nan)


def nearest_to_medoid(curves: np.ndarray, members: np.ndarray, count: int) -> np.ndarray:
    """Token indices of the ``count`` members closest to the cluster medoid, medoid first."""
    centre = curves[medoid(curves, members)]
    idx = np.nonzero(members)[0]
    return np.asarray(idx[np.argsort(np.sqrt(((curves[idx] - centre) ** 2).sum(-1)), kind="stable")[:count]])


Bound = int | str
"""A window bound: a training step, ``"start"`` / ``"tau"`` (starts) or ``"end"``."""


def window_pairs(window: list[Bound] | list[list[Bound]] | None) -> list[tuple[Bound, Bound]]:
    """``[analyses.clusters] window`` as a list of (start, end) pairs (default: the whole run)."""
    if window is None:
        return [("start", "end")]
    pairs: list[Any] = window if window and isinstance(window[0], list) else [window]
    if any(not isinstance(p, list) or len(p) != 2 for p in pairs):
        raise JobSpecError(
            f"analyses.clusters.window = {window!r} must be one [start, end] pair or a list of them, "
            'e.g. ["tau", "end"] or [[0, "end"], ["tau", "end"]]'
        )
    return [(p[0], p[1]) for p in pairs]


def window_label(start: Bound, end: Bound, steps: np.ndarray) -> str:
    """The ``window`` coordinate: ``"<start>-<end>"`` in steps (``"tau-<end>"`` from τ)."""
    first = int(steps[0]) if start == "start" else start
    last = int(steps[-1]) if end == "end" else end
    return f"{first}-{last}"


def window_span(start: float, end: float, steps: np.ndarray) -> slice:
    """docs/polca.md, "Windows": the checkpoints from the first at or after ``start`` to the last at or
    before ``end``; ValueError if that leaves fewer than two."""
    first = int(np.searchsorted(steps, start, side="left"))
    last = int(np.searchsorted(steps, end, side="right")) - 1
    if last - first < 1:
        raise ValueError(f"the window {start:g}–{end:g} holds fewer than two checkpoints of {steps.tolist()}")
    return slice(first, last + 1)


# --- the analysis ---


@dataclass(frozen=True)
class ClusterParams:
    """``[analyses.clusters]`` options."""

    trajectories: list[Trajectory] = field(default_factory=lambda: ["polca", "exact_loss"])
    min_cluster_fraction: float = 0.03
    min_samples_fraction: float = 1 / 15
    normalize: Literal["none", "zscore", "range"] = "none"
    lag: int | None = None
    tau: float | None = None
    label: str | None = None
    label_value: int = 1
    restrict: str | None = None
    restrict_values: list[int] | None = None
    restrict_fraction: float = 0.85
    max_clusters: int = 20
    window: list[Bound] | list[list[Bound]] | None = None


@register
class Clusters(Analysis[ClusterParams]):
    """One global unit per trajectory type and window: clusters per basis vector (or once for exact
    losses) of the curves over the window's checkpoints (docs/polca.md, "Windows")."""

    name = "clusters"

    def requires(self) -> tuple[type[Analysis[Any]], ...]:
        return (TokenLoss, Polca) if self._projected() else (TokenLoss,)

    def _projected(self) -> bool:
        return bool(set(PROJECTED) & set(self.params.trajectories))

    def check(self, ctx: PlanContext) -> None:
        """The windows, the lag, the restriction and the label fit the run and its data, and POLCA
        computes every basis a projected trajectory clusters."""
        steps = np.array([c.step for c in ctx.checkpoints])
        self._check_windows(steps)
        self._check_lag(steps)
        self._check_restriction(ctx)
        if self.params.label and self.params.label not in label_names(ctx.job.data):
            raise JobSpecError(
                f"analyses.clusters.label {self.params.label!r} is not a label of the data; "
                f"labels: {label_names(ctx.job.data) or 'none'}"
            )
        if self._projected():
            absent = sorted(self._needed_bases() - set(self._basis_sizes(ctx)))
            if absent:
                raise JobSpecError(f"analyses.clusters needs analyses.polca.bases to include {absent}")

    def _needed_bases(self) -> set[str]:
        return {PROJECTED[t] for t in self.params.trajectories if t in PROJECTED}

    def _basis_sizes(self, ctx: PlanContext) -> dict[str, tuple[str, int]]:
        return Polca.from_spec(ctx.job.analyses[Polca.name]).sizes(ctx)

    def _vectors(self, ctx: PlanContext) -> int:
        """Size of the ``cluster_vector`` dimension: the largest basis clustered (1 without POLCA)."""
        if not self._projected():
            return 1
        sizes = self._basis_sizes(ctx)
        return max(sizes[b][1] for b in self._needed_bases())

    def _windows(self, steps: np.ndarray) -> dict[str, tuple[Bound, Bound]]:
        """Each window by its label (checked by :meth:`check`)."""
        return dict(self._labelled_windows(steps))

    def _labelled_windows(self, steps: np.ndarray) -> list[tuple[str, tuple[Bound, Bound]]]:
        return [(window_label(a, b, steps), (a, b)) for a, b in window_pairs(self.params.window)]

    def _check_windows(self, steps: np.ndarray) -> None:
        """Each window's bounds are valid and it holds two checkpoints (a window from τ once τ is
        known); no two windows share a label."""
        labelled = self._labelled_windows(steps)
        require_distinct([label for label, _ in labelled], "analyses.clusters.window")
        for label, (start, end) in labelled:
            if start not in ("start", "tau") and not (isinstance(start, int) and start >= 0):
                raise JobSpecError(
                    f'analyses.clusters.window start {start!r} must be a step, "start" or "tau"'
                )
            if end != "end" and not (isinstance(end, int) and end >= 0):
                raise JobSpecError(f'analyses.clusters.window end {end!r} must be a step or "end"')
            if start != "tau":
                first, last = label.split("-")
                self._span(label, float(first), float(last), steps)

    @staticmethod
    def _span(label: str, start: float, end: float, steps: np.ndarray) -> slice:
        """The window's checkpoints; JobSpecError if it holds fewer than two."""
        try:
            return window_span(start, end, steps)
        except ValueError as error:
            raise JobSpecError(f"analyses.clusters.window {label}: {error}") from None

    def _check_lag(self, steps: np.ndarray) -> None:
        """The whole run must hold 2·lag (a shorter window stores no breakthrough steps)."""
        for kind in self.params.trajectories:
            curve = steps[1:] if kind == "loss_change" else steps
            try:
                lag_shift(step_grid(curve), self._lag(steps))
            except ValueError:
                raise JobSpecError(
                    f"analyses.clusters.lag = {self._lag(steps)} steps needs {kind} trajectories longer than "
                    f"2·lag; they span {curve[-1] - curve[0]} steps"
                ) from None

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        steps = np.array([c.step for c in ctx.checkpoints])
        return {
            "window": np.array(list(self._windows(steps)), dtype=object),
            "trajectory": np.array(self.params.trajectories, dtype=object),
            "cluster": np.arange(self.params.max_clusters),
            "rank": np.arange(TOP),
        }

    def _lag(self, steps: np.ndarray) -> int:
        """Δ in steps: the option, else 5 × the finest checkpoint spacing."""
        return self.params.lag or 5 * int(np.diff(steps).min())

    def _check_restriction(self, ctx: PlanContext) -> None:
        """``restrict`` names a label and ``restrict_values`` says which of its values count."""
        restrict, values = self.params.restrict, self.params.restrict_values
        if restrict is None:
            return
        if restrict not in label_names(ctx.job.data):
            raise JobSpecError(
                f"analyses.clusters.restrict {restrict!r} is not a label of the data; "
                f"labels: {label_names(ctx.job.data) or 'none'}"
            )
        present = sorted(set(ctx.eval_data.token_labels()[restrict].tolist()) - {-1})
        if not values:
            raise JobSpecError(
                f"analyses.clusters.restrict = {restrict!r} needs restrict_values, the values of "
                f"{label_variable(restrict)} whose tokens count (the data has {present}; the addition demo "
                "uses [1, 2], its 10s and 100s places)"
            )
        if not set(values) & set(present):
            raise JobSpecError(
                f"analyses.clusters.restrict_values = {values} match no token: "
                f"{label_variable(restrict)} has {present}"
            )

    def variables(self, ctx: PlanContext) -> list[Variable]:
        windows = self._windows(np.array([c.step for c in ctx.checkpoints]))
        r, v, n, m = (
            len(self.params.trajectories),
            self._vectors(ctx),
            ctx.num_tokens,
            self.params.max_clusters,
        )
        rows = {"window": len(windows), "trajectory": r}
        per_vector, per_cluster = {**rows, "cluster_vector": v}, {**rows, "cluster_vector": v, "cluster": m}
        of = functools.partial(Variable.of, unit_axes=2)
        out = [
            of(
                "cluster_label",
                {**per_vector, "token": n},
                "int32",
                fill=-3,
                doc="cluster id; −1 outlier, −2 filtered out, −3 unused vector",
            ),
            of("cluster_size", per_cluster, "int64", doc="member tokens"),
            of("cluster_medoid", per_cluster, "int64", doc="token index"),
            of("cluster_breakthrough", per_cluster, doc="mean breakthrough step (acceleration)"),
            of("cluster_breakthrough_paper", per_cluster, doc="mean breakthrough step (paper-literal)"),
            of("cluster_hidden", per_cluster, "int8", doc="breakthrough > τ"),
            of("cluster_tau", rows, doc="τ, in steps"),
            of("cluster_hidden_fraction", rows, doc="share of clusters with hidden breakthroughs"),
            of("cluster_window_start", rows, doc="step of the window's first checkpoint"),
            of("cluster_window_end", rows, doc="step of the window's last checkpoint"),
        ]
        if self.params.label:
            out += [
                of(f"cluster_{s}", per_cluster, doc=f"label {s}") for s in ("homogeneity", "recall", "f1")
            ]
            out += [
                of(
                    "cluster_scored",
                    per_cluster,
                    "int8",
                    doc="1 if the cluster passes the restriction (always 1 without one)",
                ),
                of(
                    "cluster_label_auc",
                    per_vector,
                    doc="ROC AUC of the label against each curve's total change (restricted tokens)",
                ),
                of(
                    "cluster_top_homogeneity",
                    {**rows, "rank": TOP},
                    doc="best scored cluster per vector, top 3 across vectors",
                ),
            ]
        return out

    def units(self, ctx: PlanContext) -> list[Unit]:
        deps = [u.id for u in TokenLoss.from_spec({}).units(ctx)]
        if self._projected():
            deps.append(Unit(Polca.name, FINALIZE).id)
        windows = self._windows(np.array([c.step for c in ctx.checkpoints]))
        return [
            Unit(self.name, f"{t}@{w}", None, tuple(deps)) for w in windows for t in self.params.trajectories
        ]

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        steps = np.array([c.step for c in ctx.checkpoints])
        kind, label = unit.key.split("@")
        read = functools.cache(ctx.read)  # token_loss serves both τ and the curves
        loss = read("token_loss").astype(np.float64)  # (C, N)
        tau = self.params.tau if self.params.tau is not None else default_tau(steps, loss.mean(axis=1))
        start, end = label.split("-")
        span = self._span(label, tau if start == "tau" else float(start), float(end), steps)
        sets, kept = trajectory_curves(kind, read, span)  # (V, N, C'), (V, N)
        index = (list(self._windows(steps)).index(label), self.params.trajectories.index(kind))  # type: ignore[arg-type]
        curve_steps = steps[span][1:] if kind == "loss_change" else steps[span]
        lag = self._lag(steps)
        try:
            lag_shift(step_grid(curve_steps), lag)
        except ValueError:
            log.warning(
                "clusters/%s: the window spans %d steps, not more than 2·lag = %d, so its breakthrough "
                "steps and hidden flags are NaN (its clusters are scored)",
                unit.key,
                curve_steps[-1] - curve_steps[0],
                2 * lag,
            )
        has_label = self._has_label(ctx)
        allowed = None
        if self.params.restrict:
            allowed = np.isin(
                ctx.read(label_variable(self.params.restrict)), self.params.restrict_values or []
            )

        def cluster(pair: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
            return self._cluster(pair[0], pair[1], curve_steps, lag, tau, has_label, allowed)

        with _fitting_threads(ctx.job.compute.torch_threads) as pool:
            results = list(pool.map(cluster, zip(sets, kept, strict=True)))
        if allowed is not None and not any((r["scored"] == 1).any() for r in results):
            log.warning(
                "clusters/%s: no cluster passes restrict = %r (values %s, fraction %s), so none is scored",
                unit.key,
                self.params.restrict,
                self.params.restrict_values,
                self.params.restrict_fraction,
            )
        used = {PROJECTED[t] for t in self.params.trajectories if t in PROJECTED}
        vectors = max((len(ctx.read(f"basis_kept{suffix(b)}")) for b in used), default=1)
        window = np.array([steps[span][0], steps[span][-1]], dtype=np.float64)
        return self._writes(index, results, tau, vectors, window)

    def _has_label(self, ctx: UnitContext) -> np.ndarray | None:
        if not self.params.label:
            return None
        return np.asarray(ctx.read(label_variable(self.params.label)) == self.params.label_value)

    def _cluster(
        self,
        curves: np.ndarray,
        kept: np.ndarray,
        steps: np.ndarray,
        lag: int,
        tau: float,
        has_label: np.ndarray | None,
        allowed: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        labels = np.full(len(curves), FILTERED)
        if kept.sum() >= MIN_CLUSTERED:
            labels[kept] = hdbscan_labels(
                normalise(curves[kept], self.params.normalize),
                min_cluster_fraction=self.params.min_cluster_fraction,
                min_samples_fraction=self.params.min_samples_fraction,
            )
        grid, uniform = uniform_grid(steps, curves)
        onsets = {c: _onsets(grid, uniform, lag, c) for c in ("acceleration", "paper")}
        m = self.params.max_clusters
        out = {
            "auc": np.array(np.nan if has_label is None else _curve_auc(curves, has_label, allowed)),
            "labels": labels,
            **{
                k: np.full(m, np.nan)
                for k in ("breakthrough", "paper", "hidden", "homogeneity", "recall", "f1", "scored")
            },
            "size": np.full(m, -1),
            "medoid": np.full(m, -1),
        }
        for cluster in range(min(int(labels.max()) + 1, m)):
            members = labels == cluster
            out["size"][cluster] = members.sum()
            out["medoid"][cluster] = medoid(curves, members)
            out["breakthrough"][cluster] = onsets["acceleration"][members].mean()
            out["paper"][cluster] = onsets["paper"][members].mean()
            onset = out["breakthrough"][cluster]
            out["hidden"][cluster] = np.nan if np.isnan(onset) else onset > tau
            if has_label is not None:
                scores = label_scores(labels, has_label, cluster)
                out["homogeneity"][cluster], out["recall"][cluster], out["f1"][cluster] = scores
                out["scored"][cluster] = allowed is None or passes_restriction(
                    members, has_label, allowed, self.params.restrict_fraction
                )
        return out

    def _writes(
        self,
        row: tuple[int, int],
        results: list[dict[str, np.ndarray]],
        tau: float,
        vectors: int,
        window: np.ndarray,
    ) -> list[Write]:
        def stack(key: str, fill: float) -> np.ndarray:
            rows = [r[key] for r in results]
            pad = [np.full_like(rows[0], fill)] * (vectors - len(rows))
            return np.stack(rows + pad)

        hidden = stack("hidden", np.nan)
        writes = [
            Write("cluster_label", row, stack("labels", -3).astype(np.int32)),
            Write("cluster_size", row, stack("size", -1)),
            Write("cluster_medoid", row, stack("medoid", -1)),
            Write("cluster_breakthrough", row, stack("breakthrough", np.nan)),
            Write("cluster_breakthrough_paper", row, stack("paper", np.nan)),
            Write("cluster_hidden", row, np.nan_to_num(hidden, nan=-1).astype(np.int8)),
            Write("cluster_tau", row, np.array(tau)),
            Write("cluster_window_start", row, np.array(window[0])),
            Write("cluster_window_end", row, np.array(window[1])),
            Write(
                "cluster_hidden_fraction",
                row,
                np.array(np.nanmean(hidden) if np.isfinite(hidden).any() else np.nan),
            ),
        ]
        if self.params.label:
            scored = stack("scored", np.nan)
            homogeneity = np.where(scored == 1, stack("homogeneity", np.nan), np.nan)
            writes += [Write(f"cluster_{s}", row, stack(s, np.nan)) for s in ("homogeneity", "recall", "f1")]
            writes.append(Write("cluster_scored", row, np.nan_to_num(scored, nan=-1).astype(np.int8)))
            writes.append(Write("cluster_label_auc", row, stack("auc", np.nan)))
            best = np.array([np.nanmax(h) if np.isfinite(h).any() else np.nan for h in homogeneity])
            finite = np.sort(best[np.isfinite(best)])[::-1][:TOP]
            top = np.full(TOP, np.nan)
            top[: len(finite)] = finite
            writes.append(Write("cluster_top_homogeneity", row, top))
        return writes
