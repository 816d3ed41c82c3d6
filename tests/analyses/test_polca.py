"""POLCA: formulas on quadratic losses with known answers, filters, and the pipeline end to end."""

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import build_local_run, job_dict

from ckpt_analysis.analyses.polca import (
    Polca,
    conservation_residual,
    explained_fraction,
    filters,
    first_order,
    projected_loss,
    second_order_exact,
    second_order_paper,
    simpson_total,
    trapezoid_total,
)
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.curvature import ParamLayout
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.losses import scored_token_losses
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.report import validity_rows
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results


def _quadratic_case(single_direction: bool):  # type: ignore[no-untyped-def]
    """Per-token quadratic losses ℓ_x(θ) = ½θᵀA_xθ + g_xᵀθ, a trajectory inside span(B)."""
    rng = np.random.default_rng(0)
    dim, k, tokens, steps = 6, 3, 5, 4
    a = rng.normal(size=(tokens, dim, dim))
    a = a + a.transpose(0, 2, 1)
    g = rng.normal(size=(tokens, dim))
    basis = np.linalg.qr(rng.normal(size=(dim, k)))[0].T  # (k, dim), orthonormal rows
    moves = rng.normal(size=(steps - 1, k))
    if single_direction:
        moves = moves * np.eye(k)[np.arange(steps - 1) % k]
    theta = np.concatenate([rng.normal(size=(1, dim)) @ basis.T @ basis, moves @ basis]).cumsum(axis=0)
    loss = np.einsum("ti,xij,tj->tx", theta, a, theta) / 2 + theta @ g.T
    grad = np.einsum("xij,tj->txi", a, theta) + g[None]
    p = np.einsum("bi,txi->tbx", basis, grad)
    c = np.einsum("bi,xij,bj->bx", basis, a, basis)[None].repeat(steps, axis=0)
    d = np.diff(theta, axis=0) @ basis.T
    mid = 0.5 * (p[:-1] + p[1:])  # the gradient is linear in θ
    return loss, p, c, d, mid


def test_trapezoid_and_simpson_conserve_loss_exactly_on_quadratics() -> None:
    loss, p, _, d, mid = _quadratic_case(single_direction=False)
    for total in (trapezoid_total(p, d), simpson_total(p, mid, d)):
        np.testing.assert_allclose(conservation_residual(loss, total), 0, atol=1e-10)
        assert explained_fraction(loss, total)[1] == pytest.approx(1.0)
    assert np.abs(conservation_residual(loss, first_order(p, d))).max() > 1e-3


def test_exact_second_order_conserves_when_each_step_moves_along_one_basis_vector() -> None:
    loss, p, c, d, _ = _quadratic_case(single_direction=True)
    total = first_order(p, d) + second_order_exact(c, d)
    np.testing.assert_allclose(conservation_residual(loss, total), 0, atol=1e-10)


def test_projected_loss_starts_at_zero_and_accumulates() -> None:
    polca = np.arange(12.0).reshape(3, 2, 2)
    out = projected_loss(polca)
    assert out.shape == (4, 2, 2) and (out[0] == 0).all()
    np.testing.assert_array_equal(out[-1], polca.sum(axis=0))


def test_filters_drop_oscillating_vectors_and_rising_tokens() -> None:
    end = np.array([[-1.0, -2.0, 0.5], [1.0, 2.0, -0.5], [-1.0, 0.0, 0.9]])
    projected = np.stack([np.zeros_like(end), end])
    kept, tokens = filters(projected)
    assert kept.tolist() == [True, False, True]  # row means −0.83, 0.83, −0.03: only the mean counts
    assert tokens.tolist() == [[True, True, False], [False, False, False], [True, True, False]]


def test_paper_term_guards_a_flat_mean_gradient() -> None:
    p = np.zeros((3, 2, 4))
    p[:, 0] = np.array([[1.0, -1, 2, -2], [3, -3, 1, -1], [0, 0, 5, -5]])  # token mean always 0
    p[:, 1] = np.arange(12.0).reshape(3, 4)
    d = np.ones((2, 2))
    term, guarded = second_order_paper(p, d, np.array([2.0, 3.0]))
    assert guarded.tolist() == [2, 0]
    assert (term[:, 0] == 0).all()
    mean_change = p[1:, 1].mean(axis=1) - p[:-1, 1].mean(axis=1)
    np.testing.assert_allclose(term[:, 1], 0.5 * 3.0 * (p[1:, 1] - p[:-1, 1]) / mean_change[:, None])


SMALL: dict[str, Any] = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def polca_store(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("polca")
    run = build_local_run(root / "run", [0, 10, 20, 30], seed=8, **SMALL)
    analyses = {
        "hessian_basis": {
            "k": 2,
            "every": 10,
            "axis": 4,
            "sample_sequences": 8,
            "tol": 1e-6,
            "rayleigh": True,
            "shuffled": True,
        },
        "token_loss": {},
        "polca": {
            "bases": ["hessian", "random", "axis", "shuffled"],
            "second_order": "trapezoid",
            "measure_all_variants": True,
            "store": ["terms", "first", "second", "taylor"],
        },
    }
    job = job_from_dict(
        job_dict(run, root / "p.zarr", analyses=analyses, data={"num_examples": 16}), base=root
    )
    outcomes = run_job(job)
    assert {o.status for o in outcomes} == {"done"}
    assert outcomes[-1].name == "polca/finalize"
    return job, open_results(job.output)


def test_step_projections_and_terms_follow_the_stored_pieces(polca_store) -> None:  # type: ignore[no-untyped-def]
    job, ds = polca_store
    source = CheckpointSource.from_spec(job.checkpoints)
    models = [source.load(c) for c in source.checkpoints()]
    layout = ParamLayout.from_model(models[0], ["*"])
    basis = torch.from_numpy(ds.basis_vectors.values)
    for t in range(3):
        step = layout.flatten(models[t + 1]) - layout.flatten(models[t])
        np.testing.assert_allclose(ds.step_proj.values[t], (basis @ step).numpy(), rtol=1e-5, atol=1e-7)
    assert np.isnan(ds.step_proj.values[3]).all()
    p, d = ds.proj_grad.values.astype(np.float64), ds.step_proj.values[:3]
    np.testing.assert_allclose(ds.polca_first.values[:3], p[:-1] * d[:, :, None], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
        ds.polca.values[:3], 0.5 * (p[:-1] + p[1:]) * d[:, :, None], rtol=1e-5, atol=1e-9
    )
    assert (ds.projected_loss.values[0] == 0).all()
    np.testing.assert_allclose(
        ds.projected_loss.values[1:], np.cumsum(ds.polca.values[:3], axis=0), rtol=1e-5, atol=1e-7
    )
    change = np.diff(ds.token_loss.values.astype(np.float64), axis=0)
    np.testing.assert_allclose(
        ds.polca_residual.values[:3], change - ds.polca.values[:3].sum(axis=1), rtol=1e-4, atol=1e-6
    )


def test_token_losses_are_the_exact_cross_entropies(polca_store) -> None:  # type: ignore[no-untyped-def]
    job, ds = polca_store
    source = CheckpointSource.from_spec(job.checkpoints)
    model = source.load(source.checkpoints()[2])
    ids = torch.from_numpy(ds.input_ids.values)
    logits = model(input_ids=ids).logits
    seq, pos = ds.token_sequence.values, ds.token_position.values
    expected = torch.nn.functional.cross_entropy(logits[seq, pos - 1], ids[seq, pos], reduction="none")
    np.testing.assert_allclose(ds.token_loss.values[2], expected.detach().numpy(), rtol=1e-5)


def test_every_variant_is_measured_and_filters_are_consistent(polca_store) -> None:  # type: ignore[no-untyped-def]
    _, ds = polca_store
    explained = ds.polca_explained.to_series()
    assert list(explained.index) == ["none", "exact", "paper", "trapezoid", "simpson"]
    assert np.isfinite(explained.values).all()
    end = ds.projected_loss.values[-1]
    np.testing.assert_array_equal(ds.basis_kept.values == 1, end.mean(axis=1) < 0)
    np.testing.assert_array_equal(ds.token_kept.values == 1, (end.mean(axis=1) < 0)[:, None] & (end <= 0))
    assert ds.proj_curv.shape == ds.proj_grad.shape and np.isfinite(ds.proj_grad_mid.values[:3]).all()


def test_random_axis_and_shuffled_bases_run_through_the_same_pipeline(polca_store) -> None:  # type: ignore[no-untyped-def]
    job, ds = polca_store
    source = CheckpointSource.from_spec(job.checkpoints)
    models = [source.load(c) for c in source.checkpoints()]
    layout = ParamLayout.from_model(models[0], ["*"])
    index = ds.basis_axis_param.values
    for t in range(3):
        step = (layout.flatten(models[t + 1]) - layout.flatten(models[t])).numpy()
        np.testing.assert_allclose(
            ds.step_proj_axis.values[t], step[index], rtol=1e-5, atol=1e-8
        )  # LCA: Δθ_i
        shuffled = ds.basis_shuffled.values.astype(np.float64) @ step
        np.testing.assert_allclose(ds.step_proj_shuffled.values[t], shuffled, rtol=1e-5, atol=1e-7)
    assert sorted(ds.basis_shuffled_step.values.tolist()) == sorted(ds.basis_step.values.tolist())
    assert np.isfinite(ds.polca_explained_shuffled.to_series()).all()  # paper via its Ritz values
    assert ds.projected_loss_axis.dims == ("step", "basis_axis", "token")
    assert ds.projected_loss_random.shape == ds.projected_loss.shape
    for x in ("random", "axis"):
        assert np.isfinite(ds[f"polca_explained_{x}"].to_series()).all(), x  # paper via Rayleigh λ_b
        assert np.isfinite(ds[f"basis_{x}_eigval"].values).all(), x


def test_all_variants_can_be_measured_on_chosen_bases_only(polca_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, full = polca_store
    polca = {"bases": ["hessian", "random"], "measure_all_variants": ["hessian"]}
    analyses = {**job.analyses, "polca": polca}
    run = Path(str(job.checkpoints.path))
    raw = job_dict(run, tmp_path / "h.zarr", analyses=analyses, data={"num_examples": 16})
    run_job(job_from_dict(raw, base=tmp_path))
    ds = open_results(tmp_path / "h.zarr")
    np.testing.assert_allclose(ds.polca_explained.values, full.polca_explained.values, rtol=1e-6)
    assert "proj_curv" in ds and "proj_curv_random" not in ds and "proj_grad_mid_random" not in ds
    random = ds.polca_explained_random.to_series()
    assert random[["exact", "simpson"]].isna().all() and random[["none", "trapezoid"]].notna().all()
    analyses["polca"] = {"bases": ["hessian"], "measure_all_variants": ["axis"]}
    raw = job_dict(run, tmp_path / "x.zarr", analyses=analyses)
    with pytest.raises(JobSpecError, match=r"measure_all_variants names 'axis', not in bases"):
        prepare_store(job_from_dict(raw, base=tmp_path), force=False)


def test_paper_variant_on_other_bases_needs_their_rayleigh_quotients(polca_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, _ = polca_store
    analyses = {
        "hessian_basis": {"k": 1, "axis": 4},
        "token_loss": {},
        "polca": {"bases": ["axis"], "second_order": "paper"},
    }
    raw = job_dict(Path(str(job.checkpoints.path)), tmp_path / "x.zarr", analyses=analyses)
    with pytest.raises(JobSpecError, match=r"set hessian_basis\.rayleigh = true"):
        prepare_store(job_from_dict(raw, base=tmp_path), force=False)
    assert not (tmp_path / "x.zarr").exists()


def test_simpson_midpoint_moves_the_whole_model_when_a_parameter_subset_is_analysed(tmp_path: Path) -> None:
    """P[t+½] must equal per-token autograd at θ_t + ½Δθ_t of every parameter, not only the subset."""
    from torch.func import functional_call

    run = build_local_run(tmp_path / "run", [0, 10], seed=9, **SMALL)
    subset = ["gpt_neox.layers.0.attention.*"]
    analyses = {
        "hessian_basis": {
            "k": 2,
            "every": 10,
            "sample_sequences": 8,
            "params": subset,
            "random": False,
            "axis": 0,
        },
        "token_loss": {},
        "polca": {"second_order": "simpson"},
    }
    job = job_from_dict(
        job_dict(run, tmp_path / "s.zarr", analyses=analyses, data={"num_examples": 8}), base=tmp_path
    )
    assert {o.status for o in run_job(job)} == {"done"}
    ds = open_results(job.output)
    source = CheckpointSource.from_spec(job.checkpoints)
    first, second = (source.load(c) for c in source.checkpoints())
    after = dict(second.named_parameters())
    middle = {n: 0.5 * (p.detach() + after[n].detach()) for n, p in first.named_parameters()}
    layout = ParamLayout.from_model(first, subset)
    ids = torch.from_numpy(ds.input_ids.values)
    seq, pos = ds.token_sequence.values, ds.token_position.values
    basis = torch.from_numpy(ds.basis_vectors.values)
    expected = np.zeros((basis.shape[0], len(seq)))
    for x in range(len(seq)):
        params = {n: middle[n].clone().requires_grad_(n in layout.names) for n in middle}
        logits = functional_call(
            first, params, args=(), kwargs={"input_ids": ids[seq[x] : seq[x] + 1]}
        ).logits
        loss = torch.nn.functional.cross_entropy(logits[0, pos[x] - 1], ids[seq[x], pos[x]])
        grads = torch.autograd.grad(loss, [params[n] for n in layout.names])
        expected[:, x] = (basis @ torch.cat([g.reshape(-1) for g in grads])).numpy()
    np.testing.assert_allclose(ds.proj_grad_mid.values[0], expected, rtol=1e-4, atol=1e-6)


def test_polca_computes_in_the_jobs_dtype_unless_told(tmp_path: Path) -> None:
    """checkpoints.dtype = float64 makes D = ⟨b, Δθ⟩ exact to float64 rounding, not float32's."""
    run = build_local_run(tmp_path / "run", [0, 10], seed=9, **SMALL)
    analyses = {
        "hessian_basis": {"k": 2, "every": 10, "sample_sequences": 8, "random": False, "axis": 0},
        "token_loss": {},
        "polca": {},
    }
    raw = job_dict(run, tmp_path / "d.zarr", analyses=analyses, data={"num_examples": 8})
    raw["checkpoints"]["dtype"] = "float64"
    job = job_from_dict(raw, base=tmp_path)
    assert {o.status for o in run_job(job)} == {"done"}
    ds = open_results(job.output)
    source = CheckpointSource.from_spec(job.checkpoints)
    first, second = (source.load(c) for c in source.checkpoints())
    layout = ParamLayout.from_model(first, ["*"])
    step = (layout.flatten(second) - layout.flatten(first)).numpy()
    expected = ds.basis_vectors.values.astype(np.float64) @ step
    np.testing.assert_allclose(ds.step_proj.values[0], expected, rtol=1e-12)


def test_per_interval_validity_is_stored_and_drawn(polca_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from ckpt_analysis.plots import plot_validity
    from ckpt_analysis.report import validity_rows

    job, ds = polca_store
    loss = ds.token_loss.values.astype(np.float64)
    np.testing.assert_allclose(
        ds.polca_interval_change.values[:3], np.diff(loss, axis=0).mean(axis=1), rtol=1e-5
    )
    predicted = ds.polca_interval_predicted.sel(variant="none").values[:3]
    np.testing.assert_allclose(
        predicted, ds.polca_first.values[:3].astype(np.float64).sum(axis=1).mean(axis=1), rtol=1e-4
    )
    assert np.isfinite(ds.polca_interval_predicted.values[:3]).all()  # measure_all_variants: every variant
    source = CheckpointSource.from_spec(job.checkpoints)
    models = [source.load(c) for c in source.checkpoints()]
    layout = ParamLayout.from_model(models[0], ["*"])
    norms = [float((layout.flatten(b) - layout.flatten(a)).norm()) for a, b in itertools.pairwise(models)]
    np.testing.assert_allclose(ds.step_norm.values[:3], norms, rtol=1e-5)
    rows = validity_rows(ds)
    variants = {f"basis, {v}" for v in ("none", "exact", "paper", "trapezoid", "simpson")}
    assert [r[0] for r in rows] == [0, 10, 20]
    assert set(rows[0][3]) == {"gradient, first", "gradient, trapezoid"} | variants
    batch = [torch.from_numpy(ds[n].values) for n in ("input_ids", "attention_mask", "score_mask")]
    losses = [scored_token_losses(m, *batch).mean() for m in models]
    grads = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])
        for loss, m in zip(losses, models, strict=True)
    ]
    for t in range(3):
        step = layout.flatten(models[t + 1]) - layout.flatten(models[t])
        first, after = float(grads[t] @ step), float(grads[t + 1] @ step)
        np.testing.assert_allclose(ds.taylor_change.values[t], [first, 0.5 * (first + after)], rtol=1e-4)
    assert plot_validity(ds, tmp_path / "v.png").stat().st_size > 0
    cli = subprocess.run(
        [sys.executable, "-m", "ckpt_analysis", "validity", job.output],
        capture_output=True,
        text=True,
        check=False,
    )
    printed = " ".join(cli.stdout.split())
    assert cli.returncode == 0 and "relative error of each prediction" in printed, cli.stderr
    assert "each second-order variant explains" in printed and "second_order = 'trapezoid'" in printed
    for basis in ("hessian", "random", "axis"):
        assert f"│ {basis} " in cli.stdout, basis


@pytest.mark.parametrize(
    ("steps", "basis", "message"),
    [
        ([0], {"k": 1, "every": 10, "sample_sequences": 4}, "analyses.polca needs at least two checkpoints"),
        ([0, 10], {"k": 1, "every": 10, "sample_sequences": 4, "axis": 10**9}, r"axis = 10+ exceeds the"),
    ],
)
def test_the_plan_checks_refuse_a_job_that_cannot_run_before_anything_is_written(
    tmp_path: Path, steps: list[int], basis: dict[str, Any], message: str
) -> None:
    run = build_local_run(tmp_path / "run", steps)
    analyses = {"hessian_basis": basis, "token_loss": {}, "polca": {"bases": ["hessian"]}}
    job = job_from_dict(job_dict(run, tmp_path / "p.zarr", analyses=analyses), base=tmp_path)
    with pytest.raises(JobSpecError, match=message):
        run_job(job)
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.parametrize("store", [[], ["terms"]])
def test_a_basis_over_its_memory_budget_streams_to_the_same_projections_and_the_store_keeps_what_is_asked(
    tmp_path: Path, store: list[str]
) -> None:
    run = build_local_run(tmp_path / "run", [0, 10, 20], seed=12, **SMALL)
    basis = {"k": 2, "every": 10, "sample_sequences": 8, "random": True}
    stores = {}
    for name, budget in (("kept", 8192), ("streamed", 1e-5)):
        polca = {"bases": ["hessian", "random"], "basis_memory_mb": budget, "store": store}
        analyses = {"hessian_basis": basis, "token_loss": {}, "polca": polca}
        raw = job_dict(run, tmp_path / f"{name}.zarr", analyses=analyses, data={"num_examples": 8})
        job = job_from_dict(raw, base=tmp_path)
        assert {o.status for o in run_job(job, executor="inprocess")} == {"done"}
        stores[name] = open_results(job.output)
    kept, streamed = stores["kept"], stores["streamed"]
    assert kept.proj_grad.shape == (3, 6, kept.sizes["token"])
    for name in ("proj_grad", "proj_grad_random", "step_proj", "projected_loss"):
        np.testing.assert_allclose(streamed[name].values, kept[name].values, rtol=1e-5, atol=1e-7)
    assert ("polca" in kept) == ("terms" in store)
    assert "polca_first" not in kept and "polca_second" not in kept and "taylor_change" not in kept
    assert all(not name.startswith("gradient") for row in validity_rows(kept) for name in row[3])


def test_tf32_checks_report_conservation_both_ways_on_the_checked_intervals(tmp_path: Path) -> None:
    """Off CUDA TF32 changes nothing, so the fp32 check must reproduce the stored projections."""
    run = build_local_run(tmp_path / "run", [0, 10, 20, 30, 40], seed=13, **SMALL)
    basis = {"k": 2, "every": 20, "sample_sequences": 8}
    polca = {"second_order": "paper", "tf32": True, "tf32_check_every": 2}
    analyses = {"hessian_basis": basis, "token_loss": {}, "polca": polca}
    raw = job_dict(run, tmp_path / "t.zarr", analyses=analyses, data={"num_examples": 8})
    job = job_from_dict(raw, base=tmp_path)
    assert {o.status for o in run_job(job, executor="inprocess")} == {"done"}
    ds = open_results(job.output)
    assert ds.tf32_check.values.tolist() == [0, 20]  # intervals starting at checkpoints 0 and 2
    for i, t in enumerate([0, 2]):
        np.testing.assert_array_equal(ds.proj_grad_fp32.values[i], ds.proj_grad.values[t : t + 2])
    residual = ds.polca_tf32_residual.values
    np.testing.assert_allclose(residual[:, 0], residual[:, 1])
    stored = np.abs(ds.polca_residual.values[[0, 2]].astype(np.float64)).mean(axis=1)
    np.testing.assert_allclose(residual[:, 0], stored, rtol=1e-5)
    explained = ds.polca_tf32_explained.values
    assert np.isfinite(explained).all() and explained[0] == pytest.approx(explained[1])


def test_tf32_refuses_the_variants_it_cannot_check(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="tf32 = false, or choose 'trapezoid' or 'paper'"):
        Polca.from_spec({"tf32": True, "second_order": "exact"})
