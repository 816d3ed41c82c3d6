"""Clusters: breakthroughs of planted sigmoid drops, planted groups, exact scores, the pipeline."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import build_local_run, job_dict
from sklearn.metrics import roc_auc_score

from ckpt_analysis.analyses.clusters import (
    breakthrough_steps,
    default_tau,
    hdbscan_labels,
    label_auc,
    label_scores,
    medoid,
    uniform_grid,
)
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results


def _drops(onsets: list[float], steps: np.ndarray, width: float = 40.0) -> np.ndarray:
    """Falling sigmoids 1 − σ((t − onset − 3w)/w): the fall starts accelerating near ``onset``."""
    return np.stack([1 - 1 / (1 + np.exp(-(steps - o) / width)) for o in onsets])


def test_breakthroughs_find_planted_sigmoid_onsets() -> None:
    steps = np.arange(0, 3001, 10)
    centres = [600.0, 1500.0, 2400.0]
    curves = _drops(centres, steps)
    found = breakthrough_steps(steps, curves, lag=100, convention="acceleration")
    assert np.all(found < centres) and np.all(np.array(centres) - found <= 100)  # onset: before the midpoint
    literal = breakthrough_steps(steps, curves, lag=100, convention="paper")
    assert np.all(literal > centres) and np.all(literal - np.array(centres) <= 100)  # paper: after it


def test_uneven_checkpoints_are_interpolated_onto_the_finest_grid() -> None:
    steps = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128])
    grid, curves = uniform_grid(steps, np.log1p(steps)[None].astype(float))
    assert grid.tolist() == list(range(0, 129)) and curves.shape == (1, 129)
    np.testing.assert_allclose(curves[0, steps], np.log1p(steps))


def test_default_tau_is_where_90_percent_of_the_drop_is_done() -> None:
    steps = np.arange(0, 100, 10)
    loss = np.array([10, 5, 3, 2, 1.5, 1.2, 1.05, 1.02, 1.01, 1.0])
    assert default_tau(steps, loss) == 40.0  # 10 − 1.5 = 8.5 ≥ 0.9 · 9


def test_hdbscan_recovers_planted_groups_of_trajectories() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(0, 1000, 20)
    groups = np.repeat([0, 1, 2], 60)
    curves = _drops([200.0, 500.0, 800.0], steps)[groups] + rng.normal(0, 0.01, (180, len(steps)))
    labels = hdbscan_labels(curves, min_cluster_fraction=0.03, min_samples_fraction=1 / 15)
    found = labels[labels >= 0]
    assert (labels >= 0).mean() > 0.9
    for g in range(3):  # each planted group maps to one cluster, and no cluster mixes groups
        assert len(set(labels[(groups == g) & (labels >= 0)])) == 1
    assert len(set(found)) == 3


def test_scores_on_a_hand_labelled_clustering_are_exact() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, -1, -1])
    carry = np.array([1, 1, 1, 0, 1, 0, 1, 1], dtype=bool)
    assert label_scores(labels, carry, 0) == pytest.approx((0.75, 0.75, 0.75))  # 3 of 4 labelled non-outliers
    assert label_scores(labels, carry, 1) == pytest.approx((0.5, 0.25, 1 / 3))


def test_medoid_is_the_most_central_member() -> None:
    curves = np.array([[0.0], [1.0], [2.0], [10.0], [3.0]])
    assert medoid(curves, np.array([True, True, True, False, True])) in (1, 2)
    assert medoid(curves, np.array([True, True, True, False, False])) == 1


SMALL: dict[str, Any] = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}


def test_cluster_analysis_end_to_end(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", list(range(0, 200, 20)), seed=3, **SMALL)
    analyses = {
        "hessian_basis": {"k": 1, "every": 60, "axis": 6, "sample_sequences": 8},
        "token_loss": {},
        "polca": {"bases": ["hessian", "random", "axis"], "second_order": "trapezoid"},
        "clusters": {
            "trajectories": ["polca", "polca_random", "polca_axis", "exact_loss", "loss_change", "fisher"],
            "label": "carry",
            "lag": 40,
            "tau": 70,
            "window": [["start", "end"], [60, "end"], ["tau", "end"], [120, 180]],
        },
    }
    job = job_from_dict(
        job_dict(run, tmp_path / "c.zarr", analyses=analyses, data={"num_examples": 80}), base=tmp_path
    )
    assert {o.status for o in run_job(job)} == {"done"}
    full = open_results(job.output)
    assert full.window.values.tolist() == ["0-180", "60-180", "tau-180", "120-180"]
    _check_windows(full)
    ds = full.isel(window=0)
    labels = ds.cluster_label.sel(trajectory="exact_loss").values
    assert (labels[1:] == -3).all() and (labels[0] >= -1).all()  # exact loss: one clustering of all tokens
    polca = ds.cluster_label.sel(trajectory="polca").values
    dropped = ds.token_kept.values == 0
    assert (polca[: len(dropped)][dropped] == -2).all()
    lca = ds.cluster_label.sel(trajectory="polca_axis").values
    assert lca.shape[0] == 6 and (lca[ds.token_kept_axis.values == 0] == -2).all()  # 6 axis vectors
    sizes = ds.cluster_size.sel(trajectory="exact_loss").values[0]
    assert sizes[sizes > 0].sum() == (labels[0] >= 0).sum()
    assert float(ds.cluster_tau.sel(trajectory="polca")) == float(ds.cluster_tau.sel(trajectory="exact_loss"))
    homogeneity = ds.cluster_homogeneity.sel(trajectory="exact_loss").values[0]
    from ckpt_analysis.report import cluster_examples

    examples = cluster_examples(full, "exact_loss", nearest=3)
    medoids = ds.cluster_medoid.sel(trajectory="exact_loss").values[0]
    for example in examples:
        assert example.size == sizes[example.cluster] and 1 <= len(example.examples) <= 3
        first = int(medoids[example.cluster])
        assert example.examples[0] == f"{ds.token_context.values[first]}⟨{ds.token_text.values[first]}⟩"
    top = ds.cluster_top_homogeneity.sel(trajectory="exact_loss").values
    assert (
        top[0] == pytest.approx(np.nanmax(homogeneity))
        if np.isfinite(homogeneity).any()
        else np.isnan(top[0])
    )
    carry = ds.label_carry.values == 1
    loss = ds.token_loss.values
    auc = ds.cluster_label_auc.sel(trajectory="exact_loss").values
    assert auc[0] == pytest.approx(roc_auc_score(carry, loss[-1] - loss[0])) and np.isnan(auc[1:]).all()
    projected = ds.projected_loss_axis.values[-1]  # L_b(x, end): the curve's change from L_b(x, 0) = 0
    expected = [roc_auc_score(carry, projected[b]) for b in range(6)]
    np.testing.assert_allclose(ds.cluster_label_auc.sel(trajectory="polca_axis").values[:6], expected)


def _check_windows(ds: Any) -> None:
    """Windowed clusters equal a by-hand re-sum of the stored POLCA terms from the window's start."""
    steps, carry = ds.step.values, ds.label_carry.values == 1
    tau = float(ds.cluster_tau.isel(window=0, trajectory=0))
    assert ds.cluster_window_start.sel(trajectory="polca").values.tolist() == [
        0,
        60,
        steps[steps >= tau][0],
        120,
    ]
    assert (ds.cluster_window_end.values == 180).all()
    part = ds.sel(window="60-180", trajectory="polca")
    terms = ds.polca.values[3:-1]  # POLCA[t] for the intervals from step 60 on
    resummed = np.concatenate([np.zeros_like(terms[:1]), np.cumsum(terms, axis=0)])  # L_b(x, t) − L_b(x, 60)
    kept_b = resummed[-1].mean(axis=1) < 0
    kept = kept_b[:, None] & (resummed[-1] <= 0)
    labels = part.cluster_label.values[: kept.shape[0]]
    assert ((labels == -2) == ~kept).all()
    for b in np.nonzero(kept.sum(axis=1) >= 3)[0]:
        expected = hdbscan_labels(
            resummed[:, b, kept[b]].T, min_cluster_fraction=0.03, min_samples_fraction=1 / 15
        )
        np.testing.assert_array_equal(labels[b, kept[b]], expected)
    auc = part.cluster_label_auc.values[: kept.shape[0]]
    np.testing.assert_allclose(auc, [roc_auc_score(carry, resummed[-1, b]) for b in range(kept.shape[0])])
    short = ds.sel(window="120-180")  # 60 steps < 2·lag: clusters scored, no breakthrough steps
    assert np.isnan(short.cluster_breakthrough.values).all() and (short.cluster_hidden.values == -1).all()
    assert (short.cluster_label.sel(trajectory="exact_loss").values[0] >= -1).all()
    exact = ds.sel(window="60-180", trajectory="exact_loss").cluster_label_auc.values[0]
    loss = ds.token_loss.values
    assert exact == pytest.approx(roc_auc_score(carry, loss[-1] - loss[3]))


def test_windows_are_refused_by_name_when_they_hold_too_few_checkpoints(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", list(range(0, 200, 20)), seed=3, **SMALL)
    for window, message in (
        ([200, "end"], "fewer than two checkpoints"),
        (["later", "end"], 'must be a step, "start" or "tau"'),
        ([[0, "end"], [0, 180]], "names 0-180 more than once"),
        (["tau"], "one \\[start, end\\] pair or a list of them"),
    ):
        analyses = {
            "token_loss": {},
            "clusters": {"trajectories": ["exact_loss"], "lag": 40, "window": window},
        }
        job = job_from_dict(job_dict(run, tmp_path / "w.zarr", analyses=analyses), base=tmp_path)
        with pytest.raises(JobSpecError, match=message):
            run_job(job)
        assert not (tmp_path / "w.zarr").exists()


def test_label_auc_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, 200).astype(float)  # many ties
    has_label = rng.random(200) < 0.3 + 0.1 * values
    assert label_auc(values, has_label) == pytest.approx(roc_auc_score(has_label, values))
    assert np.isnan(label_auc(values[has_label], has_label[has_label]))  # one class only


@pytest.mark.parametrize(
    ("analyses", "message"),
    [
        ({"clusters": {"trajectories": ["exact_loss"]}}, r"clusters needs \[analyses\.token_loss\]"),
        ({"token_loss": {}, "clusters": {}}, r"clusters needs \[analyses\.polca\]"),
        ({"token_loss": {}, "polca": {}}, r"polca needs \[analyses\.hessian_basis\]"),
        (
            {"clusters": {"trajectories": ["exact_loss"]}, "token_loss": {}},
            r"must come before \[analyses\.clusters",
        ),
    ],
)
def test_missing_or_misordered_prerequisites_are_named(
    tmp_path: Path, analyses: dict[str, Any], message: str
) -> None:
    from ckpt_analysis.registry import build_analyses

    raw = job_dict(tmp_path, tmp_path / "c.zarr")
    raw["analyses"] = analyses  # job_dict would merge in its default covariance table
    job = job_from_dict(raw, base=tmp_path)
    with pytest.raises(JobSpecError, match=message):
        build_analyses(job)


def test_a_lag_longer_than_the_trajectories_is_a_plan_time_error(tmp_path: Path) -> None:
    from ckpt_analysis.plan import prepare_store

    run = build_local_run(tmp_path / "run", [0, 10, 20], **SMALL)
    raw = job_dict(run, tmp_path / "c.zarr")
    raw["analyses"] = {"token_loss": {}, "clusters": {"trajectories": ["loss_change"], "lag": 10}}
    with pytest.raises(
        JobSpecError, match=r"lag = 10 steps needs loss_change trajectories longer than 2·lag"
    ):
        prepare_store(job_from_dict(raw, base=tmp_path), force=False)
    assert not (tmp_path / "c.zarr").exists()


def test_the_paper_restriction_scores_only_clusters_of_non_trivial_carries() -> None:
    from ckpt_analysis.analyses.clusters import passes_restriction

    carry = np.array([1, 1, 1, 1, 0, 1], dtype=bool)
    tens_or_hundreds = np.array([True, True, True, True, True, False])  # token 5: a 1000s carry
    assert passes_restriction(np.array([1, 1, 1, 1, 1, 0], dtype=bool), carry, tens_or_hundreds, 0.85)
    assert not passes_restriction(np.array([1, 1, 0, 0, 1, 1], dtype=bool), carry, tens_or_hundreds, 0.85)
    assert not passes_restriction(np.array([0, 0, 0, 0, 1, 0], dtype=bool), carry, tens_or_hundreds, 0.85)


def test_nearest_to_medoid_orders_members_by_distance_from_it() -> None:
    from ckpt_analysis.analyses.clusters import nearest_to_medoid

    curves = np.array([[0.0], [1.0], [1.1], [5.0], [0.9], [9.0]])
    members = np.array([True, True, True, True, True, False])
    assert nearest_to_medoid(curves, members, 3).tolist() == [1, 4, 2]


def test_normalisation_compares_shapes_not_scales() -> None:
    from ckpt_analysis.analyses.clusters import normalise

    curves = np.array([[0.0, 1.0, 2.0], [0.0, 10.0, 20.0], [5.0, 5.0, 5.0]])
    z = normalise(curves, "zscore")
    np.testing.assert_allclose(z[0], z[1])
    np.testing.assert_allclose(z[2], 0.0)
    r = normalise(curves, "range")
    np.testing.assert_allclose(r[:2], [[0.0, 0.5, 1.0]] * 2)
    assert normalise(curves, "none") is curves


@pytest.mark.parametrize(
    ("clusters", "message"),
    [
        ({"restrict": "place"}, r"restrict = 'place' needs restrict_values.*the data has \[0, 1, 2, 3\]"),
        (
            {"restrict": "place", "restrict_values": [100, 10]},
            r"restrict_values = \[100, 10\] match no token",
        ),
        ({"restrict": "colour", "restrict_values": [1]}, r"restrict 'colour' is not a label"),
    ],
)
def test_a_restriction_must_name_a_label_and_values_it_has(
    tmp_path: Path, clusters: dict[str, Any], message: str
) -> None:
    from ckpt_analysis.plan import prepare_store

    run = build_local_run(tmp_path / "run", [0, 10, 20, 30, 40], **SMALL)
    raw = job_dict(run, tmp_path / "c.zarr")
    raw["analyses"] = {
        "token_loss": {},
        "clusters": {"trajectories": ["exact_loss"], "label": "carry", "lag": 10, **clusters},
    }
    with pytest.raises(JobSpecError, match=message):
        prepare_store(job_from_dict(raw, base=tmp_path), force=False)


def test_the_dense_hdbscan_gives_the_tree_based_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense ``generic`` algorithm is only a faster way to the same spanning tree."""
    from ckpt_analysis.analyses import clusters

    rng = np.random.default_rng(3)
    curves = np.cumsum(rng.normal(size=(900, 60)), axis=1) * 0.05
    curves[:300] += np.linspace(0, 3, 60)
    curves[300:500] -= np.linspace(0, 2, 60)
    options = {"min_cluster_fraction": 0.03, "min_samples_fraction": 1 / 15}
    dense = clusters.hdbscan_labels(curves, **options)
    monkeypatch.setattr(clusters, "DENSE_DISTANCES_BYTES", 0)
    tree = clusters.hdbscan_labels(curves, **options)
    assert len(set(dense.tolist())) >= 3
    np.testing.assert_array_equal(dense, tree)
