"""Hessian analyses end to end, against the dense Hessian of each checkpoint (docs/benchmarks.md)."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import build_local_run, dense_hessian, job_dict, run_and_kill, write_job
from scipy.linalg import null_space

from ckpt_analysis.batching import CPU_BATCH
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict, load_job
from ckpt_analysis.data import EvalData
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results

SMALL: dict[str, Any] = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}
SOLVER = {"dtype": "float64", "tol": 1e-10, "max_iter": 400, "sample_sequences": 12}
ANALYSES = {
    "hessian": {**SOLVER, "k": 3, "trace_probes": 30, "density": True, "density_steps": 20},
    "hessian_basis": {**SOLVER, "k": 2, "axis": 5, "rayleigh": True, "shuffled": True, "seed": 3},
}


def _job(run: Path, out: Path, **overrides):  # type: ignore[no-untyped-def]
    raw = job_dict(run, out, analyses=ANALYSES, data={"num_examples": 24, "seed": 11}, **overrides)
    return job_from_dict(raw, base=out.parent)


@pytest.fixture(scope="module")
def hessian_store(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hess")
    run = build_local_run(root / "run", [0, 100, 200], seed=4, **SMALL)
    job = _job(run, root / "h.zarr")
    assert {o.status for o in run_job(job)} == {"done"}
    source = CheckpointSource.from_spec(job.checkpoints)
    ds = open_results(job.output)
    sample = EvalData(ds.input_ids.values, ds.attention_mask.values, ds.score_mask.values.astype(bool)).head(
        12
    )
    names = tuple(ds.param_name.values.tolist())
    dense = [dense_hessian(source.load(c).double(), names, sample) for c in source.checkpoints()]
    return job, ds, dense


def test_eigenvalues_and_traces_match_the_dense_hessian(hessian_store) -> None:  # type: ignore[no-untyped-def]
    _, ds, dense = hessian_store
    for i, h in enumerate(dense):
        values = torch.linalg.eigvalsh(h).flip(0)[:3].numpy()
        np.testing.assert_allclose(ds.hessian_eigval.isel(step=i).values, values, rtol=1e-6)
        assert (ds.hessian_converged.isel(step=i).values == 1).all()
        assert ds.hessian_residual.isel(step=i).max() < 1e-8 * abs(values[0])
        trace = float(h.trace())
        for method in ("hutchinson", "hutchpp"):
            est = float(ds.hessian_trace.isel(step=i).sel(trace_method=method))
            err = float(ds.hessian_trace_stderr.isel(step=i).sel(trace_method=method))
            assert abs(est - trace) <= 3 * err, method
        np.testing.assert_allclose(ds.hessian_slq_weight.isel(step=i).sum("node"), 1.0, rtol=1e-9)


@pytest.mark.parametrize(
    ("name", "order"), [("basis", [0, 100, 200]), ("basis_shuffled", [200, 100, 0])]
)  # the shuffled chain: numpy's permutation of the three links with seed 3
def test_iterative_basis_equals_top_eigenvectors_of_projected_dense_hessians(
    hessian_store: tuple[Any, Any, list[torch.Tensor]], name: str, order: list[int]
) -> None:
    _, ds, dense = hessian_store
    basis = ds[name if name == "basis_shuffled" else "basis_vectors"].values
    assert np.abs(basis @ basis.T - np.eye(len(basis))).max() <= 1e-5
    assert ds[f"{name}_step"].values.tolist() == [s for s in order for _ in range(2)]
    for link, step in enumerate(order):
        h = dense[[0, 100, 200].index(step)]
        earlier = basis[: 2 * link]
        complement = null_space(earlier) if link else np.eye(h.shape[0])  # orthonormal basis of range(Π⊥)
        values, vectors = np.linalg.eigh(complement.T @ h.numpy() @ complement)
        top = np.argsort(-values)[:2]
        rows = slice(2 * link, 2 * link + 2)
        np.testing.assert_allclose(ds[f"{name}_eigval"].values[rows], values[top], rtol=1e-6)
        cosines = np.abs(np.sum(basis[rows] * (complement @ vectors[:, top]).T, axis=1))
        assert cosines.min() >= 0.9999


def test_random_and_axis_bases(hessian_store) -> None:  # type: ignore[no-untyped-def]
    job, ds, _ = hessian_store
    random = ds.basis_random.values
    assert random.shape == ds.basis_vectors.shape
    assert np.abs(random @ random.T - np.eye(len(random))).max() <= 1e-10
    axis, index = ds.basis_axis_vectors.values, ds.basis_axis_param.values
    source = CheckpointSource.from_spec(job.checkpoints)
    final = source.load(source.checkpoints()[-1])
    theta = torch.cat([p.detach().reshape(-1) for p in final.parameters()]).abs().numpy()
    assert sorted(theta[index]) == sorted(np.sort(theta)[-5:])
    assert (axis.sum(axis=1) == 1).all() and (axis[np.arange(5), index] == 1).all()


def test_rayleigh_quotients_of_random_and_axis_bases_equal_dense_quadratic_forms(hessian_store) -> None:  # type: ignore[no-untyped-def]
    _, ds, dense = hessian_store
    last = dense[-1].numpy()  # the last basis checkpoint (every checkpoint is a link here)
    random = ds.basis_random.values
    np.testing.assert_allclose(
        ds.basis_random_eigval.values, np.einsum("bi,ij,bj->b", random, last, random), rtol=1e-8
    )
    index = ds.basis_axis_param.values
    np.testing.assert_allclose(ds.basis_axis_eigval.values, last[index, index], rtol=1e-8)


def test_same_seed_gives_identical_results(hessian_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, ds, _ = hessian_store
    again = _job(Path(job.checkpoints.path), tmp_path / "again.zarr")
    run_job(again)
    other = open_results(again.output)
    for name in ("hessian_eigval", "hessian_trace", "basis_vectors", "basis_random", "hessian_slq_node"):
        np.testing.assert_array_equal(other[name].values, ds[name].values, err_msg=name)


def test_chain_resumes_after_a_kill_between_links(hessian_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, ds, _ = hessian_store
    chain = {"hessian_basis": {**ANALYSES["hessian_basis"], "random": False, "axis": 0}}
    path = write_job(
        tmp_path / "job.toml",
        Path(job.checkpoints.path),
        tmp_path / "k.zarr",
        analyses=chain,
        data={"num_examples": 24, "seed": 11},
    )
    assert 1 <= run_and_kill(path, tmp_path / "k.zarr", after_done=1) < 3, "the kill must land between links"
    run_job(load_job(path))
    np.testing.assert_array_equal(
        open_results(tmp_path / "k.zarr").basis_vectors.values, ds.basis_vectors.values
    )


def test_a_separate_sample_set_feeds_the_hessian_not_the_analysed_tokens(tmp_path: Path) -> None:
    from ckpt_analysis.losses import scored_token_losses

    run = build_local_run(tmp_path / "run", [0, 100], seed=4, **SMALL)
    analyses = {"hessian": {"k": 1, "trace_probes": 2, "sample_sequences": 6, "max_iter": 10}}
    sample = {"source": "addition", "num_examples": 8, "seed": 99}
    job = job_from_dict(
        {**job_dict(run, tmp_path / "s.zarr", analyses=analyses, sample=sample)}, base=tmp_path
    )
    assert {o.status for o in run_job(job)} == {"done"}
    ds = open_results(job.output)
    assert ds.sample_input_ids.shape == (8, ds.input_ids.shape[1])
    assert not np.array_equal(ds.sample_input_ids.values[:6], ds.input_ids.values[:6])
    source = CheckpointSource.from_spec(job.checkpoints)
    model = source.load(source.checkpoints()[1])
    held_out = EvalData(
        ds.sample_input_ids.values, ds.sample_attention_mask.values, ds.sample_score_mask.values.astype(bool)
    ).head(6)
    batch = [torch.from_numpy(a) for a in (held_out.input_ids, held_out.attention_mask, held_out.score_mask)]
    with torch.no_grad():
        expected = scored_token_losses(model, *batch).mean().item()
    np.testing.assert_allclose(ds.hessian_loss.values[1], expected, rtol=1e-5)


@pytest.mark.parametrize("operator", ["ggn", "fisher"])
def test_ggn_and_fisher_eigenpairs_and_basis_match_their_dense_matrices(
    tmp_path: Path, operator: str
) -> None:
    from builders import dense_ggn_and_fisher

    run = build_local_run(tmp_path / "run", [0, 100], seed=4, **SMALL)
    solver = {**SOLVER, "operator": operator}
    analyses = {
        "hessian": {**solver, "k": 3, "trace_probes": 6},
        "hessian_basis": {**solver, "k": 2, "random": False, "axis": 0},
    }
    job = job_from_dict(
        job_dict(run, tmp_path / "g.zarr", analyses=analyses, data={"num_examples": 24, "seed": 11}),
        base=tmp_path,
    )
    assert {o.status for o in run_job(job)} == {"done"}
    ds = open_results(job.output)
    assert operator in ds.hessian_eigval.attrs["description"]
    sample = EvalData(ds.input_ids.values, ds.attention_mask.values, ds.score_mask.values.astype(bool)).head(
        12
    )
    names = tuple(ds.param_name.values.tolist())
    source = CheckpointSource.from_spec(job.checkpoints)
    model = source.load(source.checkpoints()[0])
    torch.nn.Module.to(model, torch.float64)
    ggn, fisher = dense_ggn_and_fisher(model, names, sample)
    dense = ggn if operator == "ggn" else fisher
    values, vectors = torch.linalg.eigh(dense)
    np.testing.assert_allclose(ds.hessian_eigval.isel(step=0).values, values.flip(0)[:3].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ds.basis_eigval.values[:2], values.flip(0)[:2].numpy(), rtol=1e-6)
    cosines = np.abs(np.sum(ds.basis_vectors.values[:2] * vectors.flip(1)[:, :2].T.numpy(), axis=1))
    assert cosines.min() >= 0.9999


def test_the_sampled_fisher_job_gives_the_eigenpairs_of_its_own_seeded_operator(tmp_path: Path) -> None:
    """``operator = "fisher_mc"`` end to end: the stored Ritz values are the top of the dense matrix
    of an operator built apart with the documented seed (``seed`` + checkpoint index); PSD."""
    from ckpt_analysis.curvature import MCFisherOperator, ParamLayout

    run = build_local_run(tmp_path / "run", [0, 100], seed=4, **SMALL)
    solver = {**SOLVER, "operator": "fisher_mc", "params": ["*attention.dense*"], "seed": 5}
    analyses = {"hessian": {**solver, "k": 3, "trace_probes": 6}}
    job = job_from_dict(
        job_dict(run, tmp_path / "f.zarr", analyses=analyses, data={"num_examples": 24, "seed": 11}),
        base=tmp_path,
    )
    assert {o.status for o in run_job(job)} == {"done"}
    ds = open_results(job.output)
    sample = EvalData(ds.input_ids.values, ds.attention_mask.values, ds.score_mask.values.astype(bool)).head(
        12
    )
    source = CheckpointSource.from_spec(job.checkpoints)
    for index, ckpt in enumerate(source.checkpoints()):
        model = source.load(ckpt)
        torch.nn.Module.to(model, torch.float64)
        layout = ParamLayout.from_model(model, ["*attention.dense*"])
        twin = MCFisherOperator(model, layout, sample, batch_size=CPU_BATCH, seed=5 + index)  # 'auto', CPU
        dense = torch.stack([twin(e) for e in torch.eye(layout.size, dtype=torch.float64)], dim=1)
        values = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)[:3].numpy()
        np.testing.assert_allclose(ds.hessian_eigval.isel(step=index).values, values, rtol=1e-6)
        assert values.min() > 0
