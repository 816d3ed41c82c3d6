"""Summaries as numbers and tables: cluster carry scores, POLCA validity and conservation, cluster
examples and leading-term alignment (their figures are in ``plots``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from rich.table import Table


@dataclass(frozen=True)
class TrajectoryScores:
    """One row of the demo table: how well a trajectory type's clusters isolate a label."""

    trajectory: str
    window: str
    """The ``window`` coordinate: the steps the curves span (docs/polca.md, "Windows")."""
    clusters: int
    top_homogeneity: tuple[float, ...]
    unrestricted: float
    recall: float
    f1: float
    hidden_fraction: float
    label_auc: float
    """Best vector's ROC AUC of the label against the curves' total change, either direction."""


def best_auc(auc: np.ndarray) -> float:
    """The most separating vector's AUC, folded so 0.5 is chance and 1.0 perfect either way."""
    finite = auc[np.isfinite(auc)]
    return float(0.5 + np.abs(finite - 0.5).max()) if finite.size else float("nan")


def best_per_vector(homogeneity: np.ndarray) -> np.ndarray:
    """Each vector's highest cluster homogeneity, −1 where it has no scored cluster."""
    return np.asarray(np.where(np.isfinite(homogeneity), homogeneity, -1).max(axis=-1))


def cluster_table(ds: xr.Dataset) -> list[TrajectoryScores]:
    """Per window and trajectory type: top-3 homogeneity, recall and F1 of the most homogeneous
    cluster, hidden share."""
    rows = []
    for window, trajectory in itertools.product(ds.window.values.tolist(), ds.trajectory.values.tolist()):
        part = ds.sel(window=window, trajectory=trajectory)
        raw = part.cluster_homogeneity.values
        homogeneity = np.where(part.cluster_scored.values == 1, raw, np.nan)
        found = np.isfinite(homogeneity)
        best = np.unravel_index(np.nanargmax(np.where(found, homogeneity, -1)), homogeneity.shape)
        rows.append(
            TrajectoryScores(
                trajectory=str(trajectory),
                window=str(window),
                clusters=int(np.isfinite(raw).sum()),
                top_homogeneity=tuple(float(x) for x in part.cluster_top_homogeneity.values),
                unrestricted=float(np.nanmax(raw)) if np.isfinite(raw).any() else float("nan"),
                recall=float(part.cluster_recall.values[best]) if found.any() else float("nan"),
                f1=float(part.cluster_f1.values[best]) if found.any() else float("nan"),
                hidden_fraction=float(part.cluster_hidden_fraction),
                label_auc=best_auc(part.cluster_label_auc.values) if "cluster_label_auc" in part else np.nan,
            )
        )
    return rows


def window_span(part: xr.Dataset) -> slice:
    """The checkpoints of one window's clusters (``part`` selected at one window and trajectory)."""
    from ckpt_analysis.analyses.clusters import window_span as span

    return span(float(part.cluster_window_start), float(part.cluster_window_end), part.step.values)


def validity_rows(ds: xr.Dataset) -> list[tuple[int, float, float, dict[str, float]]]:
    """Per checkpoint interval: start step, ‖Δθ‖, the exact change of the mean token loss and each
    computed variant's relative prediction error |predicted − exact| / |exact| (docs/polca.md,
    "Per-interval validity")."""
    change, norm = ds.polca_interval_change.values[:-1], ds.step_norm.values[:-1]
    predicted = ds.polca_interval_predicted.values[:-1]
    variants = [f"basis, {v}" for v in ds.variant.values]
    if "taylor_change" in ds:  # written when analyses.polca.store lists "taylor"
        predicted = np.concatenate([ds.taylor_change.values[:-1], predicted], axis=1)
        variants = [f"gradient, {v}" for v in ds.taylor.values] + variants
    computed = [i for i, _ in enumerate(variants) if np.isfinite(predicted[:, i]).any()]
    with np.errstate(divide="ignore", invalid="ignore"):
        errors = np.abs(predicted - change[:, None]) / np.abs(change[:, None])
    return [
        (int(step), float(n), float(c), {variants[i]: float(errors[t, i]) for i in computed})
        for t, (step, n, c) in enumerate(zip(ds.step.values[:-1], norm, change, strict=True))
    ]


def conservation(ds: xr.Dataset) -> dict[str, dict[str, float]]:
    """Per basis in the store, per second-order variant: the fraction of the aggregate loss change
    (first → last checkpoint) that Σ_t Σ_b POLCA explains (``polca_explained``; NaN: not computed)."""
    from ckpt_analysis.analyses.polca import BASIS_VARIABLES, suffix

    names = {basis: f"polca_explained{suffix(basis)}" for basis in BASIS_VARIABLES}
    return {
        basis: {str(v): float(x) for v, x in ds[name].to_series().items()}
        for basis, name in names.items()
        if name in ds
    }


def chosen_second_order(store: Path) -> str:
    """The ``second_order`` variant the job that wrote ``store`` chose (its default included)."""
    from ckpt_analysis.analyses.polca import Polca
    from ckpt_analysis.store import store_meta

    return Polca.from_spec(store_meta(store)["job_spec"]["analyses"][Polca.name]).params.second_order


@dataclass(frozen=True)
class ClusterExample:
    """One cluster, for reading: its numbers and the tokens nearest its medoid, in context."""

    vector: int
    cluster: int
    size: int
    breakthrough: float
    hidden: bool
    homogeneity: float
    examples: list[str]


def cluster_examples(
    ds: xr.Dataset, trajectory: str, *, window: int = 0, vector: int | None = None, nearest: int = 5
) -> list[ClusterExample]:
    """Each cluster of one vector (default: the one with the most homogeneous scored cluster, else
    the one with most clusters) with the ``nearest`` tokens to its medoid as ``context⟨token⟩``, in
    the clusters' ``window`` (an index; the first by default)."""
    from ckpt_analysis.analyses.clusters import nearest_to_medoid, trajectory_curves

    part = ds.isel(window=window).sel(trajectory=trajectory)
    labels = part.cluster_label.values
    if vector is None:
        score = part.cluster_homogeneity.values if "cluster_homogeneity" in part else None
        if score is not None and np.isfinite(score).any():
            vector = int(np.argmax(best_per_vector(score)))
        else:
            vector = int(np.argmax(labels.max(axis=1)))
    curves, _ = trajectory_curves(trajectory, lambda name: ds[name].values, window_span(part))
    context, text = ds.token_context.values, ds.token_text.values
    homogeneity = part.cluster_homogeneity.values[vector] if "cluster_homogeneity" in part else None
    out = []
    for c in range(int(labels[vector].max()) + 1):
        members = labels[vector] == c
        tokens = nearest_to_medoid(curves[vector], members, nearest)
        out.append(
            ClusterExample(
                vector=vector,
                cluster=c,
                size=int(members.sum()),
                breakthrough=float(part.cluster_breakthrough.values[vector, c]),
                hidden=bool(part.cluster_hidden.values[vector, c] == 1),
                homogeneity=float("nan") if homogeneity is None else float(homogeneity[c]),
                examples=[f"{context[i]}⟨{text[i]}⟩" for i in tokens],
            )
        )
    return out


@dataclass(frozen=True)
class AlignmentRow:
    """One comparison in one layer: its score at step 0 (the null), its range after, and at the end."""

    comparison: str
    layer: int
    step0: float
    lowest: float
    highest: float
    final: float
    shuffled_final: float


def alignment_table(ds: xr.Dataset) -> list[AlignmentRow]:
    """Summarise ``lt_score`` (docs/leading_terms.md) per comparison and layer, corpus vs shuffled null."""
    rows = []
    for comparison in ds.comparison.values.tolist():
        for layer in ds.layer.values.tolist():
            score = ds.lt_score.sel(comparison=comparison, layer=layer)
            real = score.sel(corpus="real").values
            later = real[1:] if real.size > 1 else real
            rows.append(
                AlignmentRow(
                    comparison=str(comparison),
                    layer=int(layer),
                    step0=float(real[0]),
                    lowest=float(np.nanmin(later)) if np.isfinite(later).any() else float("nan"),
                    highest=float(np.nanmax(later)) if np.isfinite(later).any() else float("nan"),
                    final=float(real[-1]),
                    shuffled_final=float(score.sel(corpus="shuffled").values[-1]),
                )
            )
    return rows


# --- tables the demo prints (rich) ---


def variance_table(steps: np.ndarray, total_variance: np.ndarray, participation: np.ndarray) -> Table:
    """Per step and layer: the residual stream's total variance and participation ratio."""
    table = Table(
        "step",
        *(f"layer {i} var / PR" for i in range(total_variance.shape[1])),
        title="residual stream after each layer: total variance / participation ratio",
    )
    for step, var, pr in zip(steps, total_variance, participation, strict=True):
        table.add_row(str(step), *(f"{v:8.2f} / {p:5.2f}" for v, p in zip(var, pr, strict=True)))
    return table


def conservation_table(explained: dict[str, dict[str, float]], chosen: str) -> Table:
    """:func:`conservation` per basis and variant, "—" where a variant was not computed."""
    variants = list(next(iter(explained.values())))
    table = Table(
        "basis",
        *variants,
        title=f"fraction of the loss change each second-order variant explains (1 = conserved; this "
        f"job's second_order = {chosen!r}; docs/polca.md, 'Second-order variants')",
    )
    for basis, row in explained.items():
        table.add_row(basis, *("—" if np.isnan(x) else f"{x:.3f}" for x in row.values()))
    return table


def carry_scores_table(scores: list[TrajectoryScores]) -> Table:
    """Each trajectory type's clusters scored against the carry label, beside the paper's figures."""
    table = Table(
        "trajectory",
        "window (steps)",
        "clusters",
        "carry homogeneity (top 3)",
        "recall",
        "F1",
        "hidden",
        "any-place best",
        "carry AUC",
        title="clusters vs the carry label, scored as in the paper (> 85 % of a cluster's carry tokens "
        "in the 10s/100s place); paper, 9.5M model: POLCA 0.973, LCA 0.792, exact loss 0.514. "
        "carry AUC (not in the paper): the best vector's ROC AUC of carry vs its curves' total change, "
        "10s/100s-place tokens, 0.5 = chance; a random basis of the same size is its null",
    )
    for row in scores:
        top = ", ".join("—" if np.isnan(h) else f"{h:.3f}" for h in row.top_homogeneity)
        name = "polca_axis (LCA)" if row.trajectory == "polca_axis" else row.trajectory
        numbers = (row.recall, row.f1, row.hidden_fraction, row.unrestricted, row.label_auc)
        table.add_row(name, row.window, str(row.clusters), top, *(f"{v:.3f}" for v in numbers))
    return table


def onehot_alignment_table(alignment: dict[float, list[AlignmentRow]]) -> Table:
    """The one-hot model's leading-term cosines per step size: best → final (shuffled-corpus null)."""
    table = Table(
        "comparison",
        *(f"η = {lr}: best → step 100 (shuffled)" for lr in alignment),
        title="one-hot attention model (the leading-term paper's Def. 3.1) under full-batch GD: "
        "uncentred cosine with the leading-term predictions; shuffled-corpus null in brackets",
    )
    for i, comparison in enumerate(r.comparison for r in next(iter(alignment.values()))):
        cells = [alignment[lr][i] for lr in alignment]
        table.add_row(
            comparison, *(f"{c.highest:.3f} → {c.final:.3f} ({c.shuffled_final:.3f})" for c in cells)
        )
    return table
