"""Every figure: one per analysis in a store, one ``index.html`` that shows them with captions, and
the POLCA cluster, validity and leading-term alignment figures the commands draw."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ckpt_analysis.analyses.covariance import participation_ratio
from ckpt_analysis.data import level_names
from ckpt_analysis.report import best_per_vector, validity_rows, window_span

HEATMAP_TICKS = 40
"""A heatmap labels every checkpoint's column up to this many checkpoints, then evenly spaced ones."""
DECADES = 2.0
"""Steps spanning more than this many decades get a symmetric-log step axis (step 0 stays visible)."""


@dataclass(frozen=True)
class Figure:
    """A written PNG and what its axes are."""

    path: Path
    caption: str


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG whose text chunks say its title (the suptitle, else the panels'
    titles) and how many panels carry a legend, so a reader or a test can check both; close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    titles = (
        [fig.get_suptitle()] if fig.get_suptitle() else [ax.get_title() for ax in fig.axes if ax.get_title()]
    )
    legends = sum(ax.get_legend() is not None for ax in fig.axes)
    fig.savefig(path, dpi=110, metadata={"Title": "; ".join(titles), "Legends": str(legends)})
    pyplot().close(fig)
    return path


def plot_clusters(ds: xr.Dataset, out: Path, *, vectors: int = 4, window: int = 0) -> list[Path]:
    """PNG per basis vector (the ``vectors`` with the most homogeneous clusters): the projected loss
    of each cluster beside the exact loss of the same tokens, as in the paper's figures, over the
    clusters' ``window`` (an index; the first by default)."""
    from ckpt_analysis.analyses.clusters import trajectory_curves

    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    part = ds.isel(window=window).sel(trajectory="polca")
    labels = part.cluster_label.values
    best = best_per_vector(part.cluster_homogeneity.values)
    order = [int(b) for b in np.argsort(-best) if best[b] >= 0][:vectors]
    span = window_span(part)
    steps, loss = ds.step.values[span], ds.token_loss.values[span]
    projected = trajectory_curves("polca", lambda name: ds[name].values, span)[0].transpose(2, 0, 1)
    paths = []
    for b in order:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
        for c in range(int(labels[b].max()) + 1):
            members = labels[b] == c
            share = float(part.cluster_homogeneity.values[b, c])
            name = f"cluster {c} (n={members.sum()}, carry {share:.2f})"
            left.plot(steps, projected[:, b, members].mean(axis=1), label=name)
            right.plot(steps, loss[:, members].mean(axis=1), label=name)
        for axis, title in (
            (left, f"projected loss L_b, basis vector {b}"),
            (right, "exact loss, same tokens"),
        ):
            axis.set_title(title)
            axis.set_xlabel("training step")
            axis.axvline(float(part.cluster_tau), color="grey", linestyle=":", linewidth=1)
        left.legend(fontsize=7, loc="center right")
        paths.append(_save(fig, out / f"polca_basis_{b}.png"))
    return paths


def plot_validity(ds: xr.Dataset, path: Path) -> Path:
    """Where the Taylor terms hold: each variant's relative error in the interval's loss change
    (log scale; 1 = as large as the change itself) above ‖Δθ‖ per interval (log scale)."""
    plt = pyplot()

    rows = validity_rows(ds)
    steps = [r[0] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for variant in rows[0][3]:
        top.plot(steps, [r[3][variant] for r in rows], marker=".", label=variant)
    top.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    top.set_yscale("log")
    top.set_ylabel("|predicted − exact| / |exact|")
    top.set_title("per-interval validity: error in the change of the mean token loss")
    top.legend(fontsize=7, title="prediction")
    bottom.plot(steps, [r[1] for r in rows], marker=".", color="black")
    bottom.set_yscale("log")
    bottom.set_ylabel(r"$\|\theta_{t+1} - \theta_t\|$")
    bottom.set_xlabel("training step at the start of the interval")
    return _save(fig, path)


def plot_alignment(runs: dict[str, xr.Dataset], path: Path) -> Path:
    """One panel per comparison: score against step for each run and layer; dotted = shuffled null."""
    plt = pyplot()

    comparisons = next(iter(runs.values())).comparison.values.tolist()
    fig, axes = plt.subplots(1, len(comparisons), figsize=(3.2 * len(comparisons), 3.2), squeeze=False)
    for ax, comparison in zip(axes[0], comparisons, strict=True):
        for (label, ds), colour in zip(
            runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False
        ):
            for layer in ds.layer.values.tolist():
                score = ds.lt_score.sel(comparison=comparison, layer=layer)
                name = f"{label}, layer {layer}" if ds.sizes["layer"] > 1 else label
                ax.plot(
                    ds.step,
                    score.sel(corpus="real"),
                    color=colour,
                    label=name,
                    alpha=max(0.25, 1.0 - 0.25 * layer),
                )
                ax.plot(ds.step, score.sel(corpus="shuffled"), color=colour, linestyle=":", alpha=0.6)
        ax.set_title(comparison)
        ax.set_xlabel("step")
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0.0, color="grey", linewidth=0.5)
    axes[0][0].set_ylabel("uncentred cosine")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle("alignment with the leading-term predictions (dotted: token-shuffled corpus)")
    return _save(fig, path)


def _step_axis(ax: Any, steps: np.ndarray) -> None:
    """Label the training-step axis; symmetric-log when the steps span decades (Pythia's schedule)."""
    positive = steps[steps > 0]
    if positive.size and np.log10(steps.max() / positive.min()) > DECADES:
        linthresh = max(1.0, float(positive.min()))
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(left=-0.2 * linthresh if steps.min() == 0 else None)  # no empty negative half
        ticks = [0.0] * bool(steps.min() == 0) + list(
            4.0 ** np.arange(np.ceil(np.log(steps.max()) / np.log(4)) + 1)
        )
        ticks = [t for t in ticks if t <= steps.max() * 1.05]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)  # 0, 1, 4, 16, …: readable
    ax.set_xlabel("training step")


def _covariance(ds: xr.Dataset, out: Path) -> list[Figure]:
    plt = pyplot()
    sites = ds.site.values.tolist()
    fig, axes = plt.subplots(2, len(sites), figsize=(3.6 * len(sites), 5.6), squeeze=False, sharex=True)
    cov = ds.act_cov.values.astype(np.float64)  # (step, site, layer, d, d)
    total, pr = np.trace(cov, axis1=-2, axis2=-1), participation_ratio(cov)
    for j, site in enumerate(sites):
        for layer in ds.layer.values.tolist():
            axes[0][j].plot(ds.step, pr[:, j, layer], marker=".", label=f"layer {layer}")
            axes[1][j].plot(ds.step, total[:, j, layer], marker=".")
        axes[0][j].set_title(site)
        axes[1][j].set_yscale("log")
        _step_axis(axes[1][j], ds.step.values)
    axes[0][0].set_ylabel("participation ratio (dims)")
    axes[1][0].set_ylabel("total variance tr Σ (log)")
    axes[0][-1].legend(fontsize=7)
    caption = (
        "Covariance spectra over training: top, the participation ratio (tr Σ)²/tr Σ² of each layer's "
        "activation covariance, in dimensions; bottom, the total variance tr Σ (log scale)."
    )
    return [Figure(_save(fig, out / "covariance.png"), caption)]


def _eigenvalue_axis(ax: Any, values: np.ndarray) -> None:
    """Linear when the values span less than a decade, log when they are all positive, symmetric
    log (with a threshold at the smallest magnitude) only when some are negative."""
    from matplotlib.ticker import ScalarFormatter

    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())  # 10, 20, 50 rather than 10¹ alone
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_ylabel("Ritz value (log)")
    elif finite.size and finite.min() < 0 and np.abs(finite).max() / max(np.abs(finite).min(), 1e-12) > 10:
        ax.set_yscale("symlog", linthresh=max(float(np.abs(finite[finite != 0]).min(initial=1.0)), 1e-6))
        ax.set_ylabel("Ritz value (symmetric log)")
    else:
        ax.set_ylabel("Ritz value")


def _hessian(ds: xr.Dataset, out: Path) -> list[Figure]:
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in ds.eig.values.tolist():
        values, converged = ds.hessian_eigval.sel(eig=k).values, ds.hessian_converged.sel(eig=k).values == 1
        (line,) = top.plot(ds.step, values, label=f"λ{k + 1}")
        top.plot(ds.step.values[converged], values[converged], ".", color=line.get_color())
        top.plot(ds.step.values[~converged], values[~converged], "o", mfc="none", color=line.get_color())
    top.plot([], [], "o", mfc="none", color="grey", label="not converged")
    _eigenvalue_axis(top, ds.hessian_eigval.values)
    top.set_title("top eigenvalues of the curvature operator", fontsize=8)
    for method in ds.trace_method.values.tolist():
        value = ds.hessian_trace.sel(trace_method=method)
        error = ds.hessian_trace_stderr.sel(trace_method=method)
        bottom.errorbar(ds.step, value, yerr=error, marker=".", capsize=2, label=method)
    bottom.set_ylabel("trace estimate ± 1 standard error")
    bottom.set_title("trace (a stochastic estimate, not a sum of eigenvalues)", fontsize=8)
    for ax in (top, bottom):
        _step_axis(ax, ds.step.values)
        ax.legend(fontsize=7)
    caption = (
        "Curvature over training: left, the top Ritz values of the curvature operator (hollow: not "
        "converged; log or symmetric-log scale when they span decades); right, its trace by "
        "Hutchinson and Hutch++ with one standard error."
    )
    return [Figure(_save(fig, out / "hessian.png"), caption)]


def _residual_colour(site: str, layer: int) -> str:
    """One colour per residual-stream position, so ``resid_pre`` of layer l + 1 and ``resid_post``
    of layer l (the same vectors) share it; other sites by layer."""
    return f"C{layer + 1 if site == 'resid_post' else layer}"


def _geometry(ds: xr.Dataset, out: Path) -> list[Figure]:
    plt = pyplot()
    from matplotlib.lines import Line2D

    sites, kinds = ds.geom_site.values.tolist(), ds.point_kind.values.tolist()
    fig, axes = plt.subplots(
        len(kinds), len(sites), figsize=(max(5.0, 4.2 * len(sites)), 3.8 * len(kinds)), squeeze=False
    )
    key = [
        Line2D([], [], color="k", label="TwoNN"),
        Line2D([], [], color="k", linestyle="--", label="PCA 90 %"),
    ]
    for row, kind in zip(axes, kinds, strict=True):
        for ax, site in zip(row, sites, strict=True):
            _geometry_panel(ax, ds.sel(point_kind=kind, geom_site=site), site)
            ax.set_title(f"{site}, {kind} points", fontsize=9)
            ax.legend(handles=[*ax.get_legend_handles_labels()[0], *key], fontsize=7)
        row[0].set_ylabel("dimension (log)")
    fig.suptitle(
        f"Intrinsic dimension of {', '.join(kinds)} points\n(one colour per residual-stream position)",
        fontsize=10,
    )
    caption = (
        "Intrinsic dimension over training, per layer and point kind (token: one scored token; "
        "sequence: a sequence's positions flattened, TRACE's; mean: their mean): solid, TwoNN (gaps: "
        "every sampled vector a duplicate); dashed, principal components for 90 % of the variance."
    )
    return [Figure(_save(fig, out / "geometry.png"), caption)]


def _geometry_panel(ax: Any, part: xr.Dataset, site: str) -> None:
    """One point kind and site: TwoNN (solid) and PCA 90 % (dashed) per layer, on log axes."""
    from matplotlib.ticker import ScalarFormatter

    for layer in part.layer.values.tolist():
        colour = _residual_colour(site, layer)
        twonn = part.geom_twonn.sel(layer=layer)
        ax.plot(part.step, twonn, marker=".", color=colour, label=f"layer {layer}")
        pca = part.geom_pca_dim.sel(layer=layer, pca_fraction=0.9)
        ax.plot(part.step, pca, linestyle="--", color=colour)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())  # 4, 10, 20 rather than 4×10⁰
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    _step_axis(ax, part.step.values)


def _level(ds: xr.Dataset, label: str, value: int) -> str:
    """A label value as the task names it (e.g. the grammar's ``noun``), else the number."""
    source = ds.attrs.get("ckpt_analysis", {}).get("job_spec", {}).get("data", {}).get("source", "")
    names = level_names(source).get(label, ())
    return names[value] if 0 <= value < len(names) else str(value)


def _diagnostic_references(ds: xr.Dataset, name: str, axes: Any) -> None:
    """A uniform guess's loss and entropy (log V), and the category match of ``name`` if stored."""
    vocab = ds.attrs.get("ckpt_analysis", {}).get("model_config", {}).get("vocab_size")
    if vocab:
        for ax in (axes[0], axes[2]):
            line = ax.axhline(
                np.log(vocab), color="grey", linestyle=":", label=f"uniform guess (log {vocab})"
            )
        axes[2].legend(handles=[line], fontsize=7)
    if "diag_match" in ds and name in ds.match_label.values.tolist():
        label = f"top guess has the target's {name} (all values)"
        (line,) = axes[1].plot(ds.step, ds.diag_match.sel(match_label=name), "k--", marker="x", label=label)
        axes[1].legend(handles=[line], fontsize=7)


def _diagnostics(ds: xr.Dataset, out: Path) -> list[Figure]:
    plt = pyplot()
    figures = []
    for name in [str(v)[len("diag_by_") :] for v in ds.data_vars if str(v).startswith("diag_by_")]:
        values = ds[f"diag_by_{name}"]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for ax, metric, label in zip(
            axes,
            ("loss", "correct", "entropy"),
            ("loss (nats)", "correct@1 (share)", "entropy (nats)"),
            strict=True,
        ):
            for level in ds[f"{name}_value"].values.tolist():
                ax.plot(
                    ds.step,
                    values.sel(diag_metric=metric, **{f"{name}_value": level}),
                    marker=".",
                    label=f"{name} = {_level(ds, name, level)}",
                )
            ax.set_ylabel(label)
            _step_axis(ax, ds.step.values)
        _diagnostic_references(ds, name, axes)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Output diagnostics grouped by {name}: one line per value of {name}")
        caption = f"Output diagnostics by {name}: mean loss, correct@1 and entropy per value of {name}."
        figures.append(Figure(_save(fig, out / f"diagnostics_{name}.png"), caption))
    return figures


def _heatmap(ax: Any, values: np.ndarray, steps: np.ndarray, **style: Any) -> Any:
    """``values (layer, step)`` as cells, one column per checkpoint (step labels on the ticks, so
    uneven schedules stay readable; the axis is not to scale): every checkpoint up to
    :data:`HEATMAP_TICKS`; NaN cells stay blank."""
    image = ax.imshow(
        np.ma.masked_invalid(values), aspect="auto", origin="lower", interpolation="nearest", **style
    )
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), HEATMAP_TICKS)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks], rotation=90, fontsize=6)
    ax.set_yticks(range(values.shape[0]))
    ax.set_xlabel("checkpoint (training step; not to scale)")
    ax.set_ylabel("layer")
    return image


def _probes(ds: xr.Dataset, out: Path) -> list[Figure]:
    plt = pyplot()
    sites, steps, figures = ds.probe_site.values.tolist(), ds.step.values, []
    for label in ds.probe_label.values.tolist():
        chance = float(ds.probe_majority.sel(probe_label=label))
        part = ds.sel(probe_label=label)
        spread = max(0.05, float(np.nanmax(np.abs(part.probe_selectivity.values), initial=0.0)))
        rows = [
            ("probe_accuracy", "accuracy", {"vmin": chance, "vmax": 1.0, "cmap": "viridis"}),
            ("probe_selectivity", "selectivity", {"vmin": -spread, "vmax": spread, "cmap": "RdBu_r"}),
        ]
        fig, axes = plt.subplots(2, len(sites), figsize=(4.4 * len(sites), 6), squeeze=False)
        for j, site in enumerate(sites):
            for i, (name, what, style) in enumerate(rows):
                image = _heatmap(axes[i][j], part[name].sel(probe_site=site).values.T, steps, **style)
                axes[i][j].set_title(f"{site}: {what}", fontsize=9)
                fig.colorbar(image, ax=axes[i][j])
        fig.suptitle(f"linear probes for {label!r}", fontsize=10)
        caption = (
            f"Linear probes for {label}: top, held-out accuracy of a probe on each layer's activations "
            f"(rows) at each checkpoint (columns), coloured from the majority-class rate ({chance:.2f}) "
            "to 1; bottom, selectivity = accuracy − accuracy on the control task (a random label per "
            "token type), red above 0. Columns are checkpoints in order, not to scale."
        )
        figures.append(Figure(_save(fig, out / f"probes_{label}.png"), caption))
    return figures


def _polca(ds: xr.Dataset, out: Path) -> list[Figure]:
    figures = [
        Figure(
            plot_validity(ds, out / "polca_validity.png"),
            "POLCA per-interval validity: each prediction's relative error in the interval's change of "
            "the mean token loss (log; 1 = as large as the change) above ‖Δθ‖ per interval.",
        )
    ]
    if "cluster_label" in ds and "polca" in ds.trajectory.values.tolist():
        figures += [
            Figure(
                path,
                "POLCA clusters: each cluster's mean projected loss L_b (left) beside the exact "
                "loss of the same tokens (right); dotted line τ.",
            )
            for path in plot_clusters(ds, out)
        ]
    return figures


def _alignment(ds: xr.Dataset, out: Path) -> list[Figure]:
    caption = (
        "Leading-term alignment: uncentred cosine of each comparison per layer over training; dotted, "
        "the same against the token-shuffled corpus (a null)."
    )
    plt = pyplot()
    comparisons = ds.comparison.values.tolist()
    fig, axes = plt.subplots(1, len(comparisons), figsize=(3.4 * len(comparisons), 3.2), squeeze=False)
    for ax, comparison in zip(axes[0], comparisons, strict=True):
        score = ds.lt_score.sel(comparison=comparison, corpus="real").transpose("layer", "step").values
        image = _heatmap(ax, score, ds.step.values, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        ax.set_title(comparison, fontsize=9)
    fig.colorbar(image, ax=axes[0][-1])
    heatmap = (
        "Leading-term alignment as a heatmap (the leading-term paper's Fig. 6): the uncentred cosine "
        "with each prediction per layer (rows) and checkpoint (columns, in order, not to scale)."
    )
    return [
        Figure(plot_alignment({"store": ds}, out / "leading_terms.png"), caption),
        Figure(_save(fig, out / "leading_terms_heatmap.png"), heatmap),
    ]


PLOTTERS: dict[str, Callable[[xr.Dataset, Path], list[Figure]]] = {
    "act_cov": _covariance,
    "hessian_eigval": _hessian,
    "geom_twonn": _geometry,
    "diag_token": _diagnostics,
    "probe_accuracy": _probes,
    "polca_interval_change": _polca,
    "lt_score": _alignment,
}
"""The variable whose presence means an analysis ran, and that analysis's figures."""


def plot_store(ds: xr.Dataset, out: Path) -> list[Figure]:
    """Every figure the store's analyses have, written into ``out``, and ``out/index.html``."""
    figures = [f for variable, draw in PLOTTERS.items() if variable in ds for f in draw(ds, out)]
    write_index(figures, out / "index.html")
    return figures


def write_index(figures: list[Figure], path: Path) -> Path:
    """One page showing each figure that exists, under its caption."""
    body = "\n".join(
        f'<figure><img src="{html.escape(f.path.name)}" style="max-width:100%">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in figures
        if f.path.is_file()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!doctype html><meta charset=utf-8><title>ckpt-analysis figures</title>\n{body}\n")
    return path
