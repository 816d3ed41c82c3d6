"""Geometry: TwoNN against scikit-dimension, duplicates, PCA dimensions and the stored values."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_local_run, independent_activations, job_dict

from ckpt_analysis.analyses.geometry import (
    Geometry,
    Points,
    nearest_two,
    pca_dimension,
    position_chunks,
    two_nn,
)
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results


def _manifold(n: int, dim: int, ambient: int, seed: int) -> np.ndarray:
    """``n`` points on a random ``dim``-dimensional linear patch of R^ambient, with a little curve."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, dim))
    embed = rng.normal(size=(dim, ambient))
    return np.asarray(latent @ embed + 0.1 * np.sin(latent @ embed))


def _skdim(points: np.ndarray) -> float:
    import skdim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skdim.id.TwoNN().fit(points).dimension_)


@pytest.mark.parametrize(("dim", "ambient"), [(3, 10), (8, 40)])
def test_two_nn_equals_scikit_dimension_without_duplicates(dim: int, ambient: int) -> None:
    points = _manifold(600, dim, ambient, seed=dim)
    ours, dropped = two_nn(*nearest_two(torch.from_numpy(points)))
    assert dropped == 0
    assert ours == pytest.approx(_skdim(points), rel=1e-8, abs=1e-8)
    assert dim * 0.7 < ours < dim * 1.3


def test_duplicates_are_dropped_counted_and_leave_a_finite_dimension() -> None:
    points = _manifold(400, 4, 12, seed=1)
    doubled = np.concatenate([points, points[:50], np.repeat(points[50:51], 3, axis=0)])
    ours, dropped = two_nn(*nearest_two(torch.from_numpy(doubled)))
    assert dropped == 2 * 50 + 4  # every copy of a repeated point has a neighbour at distance 0
    assert np.isfinite(ours)
    assert ours == pytest.approx(_skdim(doubled), rel=1e-8)  # scikit-dimension drops them too
    everything_equal = np.zeros((10, 3))
    assert np.isnan(two_nn(*nearest_two(torch.from_numpy(everything_equal)))[0])


def test_pca_dimension_and_participation_on_planted_spectra() -> None:
    eig = np.array([5.0, 3.0, 1.0, 0.5, 0.5])  # total 10: 50 %, 80 %, 90 %, 95 %, 100 %
    assert [pca_dimension(eig, f) for f in (0.5, 0.8, 0.9, 0.95, 1.0)] == [1, 2, 3, 4, 5]
    assert pca_dimension(eig[::-1], 0.9) == 3  # order does not matter


def test_stored_geometry_equals_a_recomputation_from_independent_activations(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10])
    analyses = {"geometry": {"sites": ["resid_pre", "resid_post"], "sample_tokens": 150, "seed": 4}}
    raw = job_dict(run, tmp_path / "g.zarr")
    raw["analyses"] = analyses  # alone: the PCA numbers come from the sample
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job))
    ds = open_results(job.output)
    source = CheckpointSource.from_spec(job.checkpoints)
    model = source.load(source.checkpoints()[1], attn="eager")
    geometry = Geometry.from_spec(analyses["geometry"])
    from ckpt_analysis.plan import make_plan

    mask = geometry.sample(make_plan(job).context, "token")
    assert mask.sum() == 150
    ds = ds.sel(point_kind="token")
    embedded = ds.sel(geom_site="resid_pre", layer=0).isel(step=1)  # one vector per vocabulary digit
    assert int(embedded.geom_twonn_dropped) > 100 and int(embedded.geom_points) == 150
    acts = independent_activations(model, make_plan(job).eval_data.input_ids)
    for site in ("resid_pre", "resid_post"):
        for layer in range(2):
            points = acts[site][layer][mask]  # (150, hidden)
            got = ds.sel(geom_site=site, layer=layer).isel(step=1)
            dimension, dropped = two_nn(*nearest_two(torch.from_numpy(points)))
            np.testing.assert_allclose(float(got.geom_twonn), dimension, rtol=1e-5)  # NaN: all duplicates
            assert int(got.geom_twonn_dropped) == dropped and int(got.geom_points) == 150
            eig = np.linalg.eigvalsh(np.cov(points, rowvar=False))
            assert got.geom_pca_dim.values.tolist() == [pca_dimension(eig, f) for f in (0.9, 0.95)]
            assert float(got.geom_participation) == pytest.approx(eig.sum() ** 2 / (eig**2).sum(), rel=1e-5)


def test_pca_numbers_reuse_the_stored_covariance_of_every_scored_token(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10])
    analyses = {
        "covariance": {"sites": ["resid_post"], "store_dtype": "float64"},
        "geometry": {"sites": ["resid_pre", "resid_post"], "sample_tokens": 40},
    }
    raw = job_dict(run, tmp_path / "g.zarr")
    raw["analyses"] = analyses
    job = job_from_dict(raw, base=tmp_path)
    from ckpt_analysis.plan import make_plan

    units = {u.id: u for u in make_plan(job).units}
    assert units["geometry/step=10"].deps == ("covariance/step=10",)
    assert all(o.ok for o in run_job(job))
    ds = open_results(job.output).sel(point_kind="token")
    cov = ds.act_cov.sel(site="resid_post").isel(step=1).values  # all 256 answer digits, not the 40
    for layer in range(2):
        eig = np.linalg.eigvalsh(cov[layer])
        got = ds.sel(geom_site="resid_post", layer=layer).isel(step=1)
        assert got.geom_pca_dim.values.tolist() == [pca_dimension(eig, f) for f in (0.9, 0.95)]
        assert float(got.geom_participation) == pytest.approx(eig.sum() ** 2 / (eig**2).sum(), rel=1e-9)
    assert int(ds.geom_points.sel(geom_site="resid_pre", layer=0).isel(step=1)) == 40  # the sample's own
    raw["analyses"] = {"geometry": analyses["geometry"], "covariance": analyses["covariance"]}
    later = job_from_dict(raw, base=tmp_path)  # covariance listed after: nothing to wait for
    assert all(not u.deps for u in make_plan(later).units)


def test_geometry_options_are_checked() -> None:
    with pytest.raises(JobSpecError, match=r"sample_tokens = 2 must be at least 3"):
        Geometry.from_spec({"sample_tokens": 2})
    with pytest.raises(JobSpecError, match=r"discard_fraction = 1.0 must be in \[0, 1\)"):
        Geometry.from_spec({"discard_fraction": 1.0})


_ONE_POSITION_MB = 40 * 32 * 8 * 2 / 1e6  # 40 sequences × hidden 32 × float64 × 2 layers


@pytest.mark.parametrize(
    ("kinds", "chunk_positions"),
    [
        (["token"], 4),
        (["sequence"], 4),
        (["mean"], 4),
        (["mean", "token", "sequence"], 4),
        (["sequence", "mean"], 3),  # streamed: chunks of 3 and 1 of the 4 scored positions
        (["sequence"], 1),
    ],
)
def test_each_point_kind_equals_scikit_dimension_on_exact_distances_of_independent_activations(
    tmp_path: Path, kinds: list[Points], chunk_positions: int
) -> None:
    import skdim
    from scipy.spatial.distance import cdist

    from ckpt_analysis.plan import make_plan

    run = build_local_run(tmp_path / "run", [0, 10])
    options = {
        "sites": ["resid_post"],
        "points": kinds[0] if len(kinds) == 1 else kinds,
        "sample_sequences": 40,
        "sample_tokens": 120,
        "seed": 3,
        "sequence_memory_mb": (chunk_positions + 0.5) * _ONE_POSITION_MB,
    }
    raw = job_dict(run, tmp_path / "g.zarr")
    raw["analyses"] = {"geometry": options}
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job))
    ds = open_results(job.output)
    assert ds.point_kind.values.tolist() == kinds
    source = CheckpointSource.from_spec(job.checkpoints)
    plan = make_plan(job)
    geometry = Geometry.from_spec(options)
    sample = geometry.sample(plan.context, "sequence")
    assert geometry._chunk_positions(plan.context, sample) == chunk_positions
    acts = independent_activations(
        source.load(source.checkpoints()[1], attn="eager"), plan.eval_data.input_ids
    )
    for kind in kinds:
        mask = Geometry.from_spec(options).sample(plan.context, kind)
        chosen = mask.any(axis=1)
        for layer in range(2):
            cells = acts["resid_post"][layer][chosen][
                :, mask[chosen][0]
            ]  # (sequences, 4 answer digits, hidden)
            points = {
                "token": acts["resid_post"][layer][mask],
                "sequence": cells.reshape(len(cells), -1),
                "mean": cells.mean(axis=1),
            }[kind]
            got = ds.sel(point_kind=kind, geom_site="resid_post", layer=layer).isel(step=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                distances = cdist(points, points)  # exact: scipy computes differences
                np.fill_diagonal(distances, np.inf)
                expected = skdim.id.TwoNN(dist=True).fit(np.sort(distances, axis=1)[:, :2]).dimension_
            assert float(got.geom_twonn) == pytest.approx(expected, rel=1e-6)
            assert int(got.geom_points) == len(points) == (120 if kind == "token" else 40)
            eig = np.linalg.eigvalsh(np.cov(points, rowvar=False))  # d × d even where d > points
            assert got.geom_pca_dim.values.tolist() == [pca_dimension(eig, f) for f in (0.9, 0.95)]
            assert float(got.geom_participation) == pytest.approx(eig.sum() ** 2 / (eig**2).sum(), rel=1e-6)


def test_position_chunks_split_each_sequence_by_scored_rank_within_the_budget() -> None:
    sample = np.zeros((5, 12), dtype=bool)
    sample[0, [1, 2, 5, 9, 10]] = True  # scored positions differ between sequences
    sample[3, [0, 4, 6, 7, 11]] = True
    chunks = position_chunks(sample, 2)
    assert [c.sum(axis=1).tolist() for c in chunks] == [[2, 0, 0, 2, 0], [2, 0, 0, 2, 0], [1, 0, 0, 1, 0]]
    assert np.array_equal(np.logical_or.reduce(chunks), sample) and not np.logical_and(*chunks[:2]).any()
    assert np.flatnonzero(chunks[0][0]).tolist() == [1, 2] and np.flatnonzero(chunks[1][3]).tolist() == [6, 7]


def test_a_sequence_budget_below_one_position_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    from ckpt_analysis.plan import make_plan

    run = build_local_run(tmp_path / "run", [0])
    raw = job_dict(run, tmp_path / "g.zarr")
    raw["analyses"] = {"geometry": {"points": ["token", "mean"], "sample_sequences": 40}}
    raw["analyses"]["geometry"]["sequence_memory_mb"] = 0.5 * _ONE_POSITION_MB
    with pytest.raises(JobSpecError, match=r"sequence_memory_mb = 0.01024 holds less than one .*0.0205 MB"):
        make_plan(job_from_dict(raw, base=tmp_path))
    assert not (tmp_path / "g.zarr").exists()
    with pytest.raises(JobSpecError, match=r"sequence_memory_mb = 0.0 must be positive"):
        Geometry.from_spec({"sequence_memory_mb": 0})


def test_point_kinds_are_checked() -> None:
    with pytest.raises(JobSpecError, match=r"points\[1\] = 'words' is not valid; choose one of: 'token'"):
        Geometry.from_spec({"points": ["token", "words"]})
    with pytest.raises(JobSpecError, match=r"points = 'words' is not valid; choose one of"):
        Geometry.from_spec({"points": "words"})
    with pytest.raises(JobSpecError, match=r"points names mean more than once"):
        Geometry.from_spec({"points": ["mean", "mean"]})


def test_sequence_points_take_sequences_of_the_commonest_scored_length_only() -> None:
    score = np.zeros((6, 8), dtype=bool)
    score[:4, 2:6] = True  # four sequences with 4 scored positions
    score[4, 2:4] = True  # one with 2
    score[5, 1:8] = True  # one with 7
    mask = Geometry.from_spec({"points": "sequence", "sample_sequences": 3})._sequence_sample(score)
    assert mask.any(axis=1).sum() == 3 and set(mask.sum(axis=1)) == {0, 4}
    assert not mask[4:].any()
