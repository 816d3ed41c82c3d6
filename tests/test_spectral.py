"""Lanczos, Hutchinson, Hutch++ and SLQ on explicit symmetric matrices."""

import numpy as np
import pytest
import torch

from ckpt_analysis.spectral import hutchinson, hutchpp, lanczos, slq

LIKE = torch.zeros(1, dtype=torch.float64)


def _matrix(n: int = 120, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0]), torch.randn(n - 5, generator=gen)])
    matrix: torch.Tensor = (q * values.double()) @ q.T
    return matrix


@pytest.mark.parametrize("which", ["largest_algebraic", "largest_magnitude"])
def test_lanczos_matches_eigh_with_small_residuals(which: str) -> None:
    a = _matrix()
    values, vectors = torch.linalg.eigh(a)
    key = values if which == "largest_algebraic" else values.abs()
    order = torch.argsort(key, descending=True)[:4]
    got = lanczos(lambda v: a @ v, a.shape[0], 4, like=LIKE, which=which, tol=1e-12, max_iter=120)  # type: ignore[arg-type]
    np.testing.assert_allclose(got.values, values[order].numpy(), rtol=1e-10)
    cosines = torch.abs((got.vectors * vectors[:, order].T).sum(dim=1))
    assert cosines.min() > 1 - 1e-10
    assert got.converged.all() and got.residuals.max() < 1e-9
    assert got.matvecs == got.iterations  # residuals cost no products


def test_largest_magnitude_finds_a_dominant_negative_eigenvalue() -> None:
    a = -_matrix() * 2
    got = lanczos(lambda v: a @ v, a.shape[0], 1, like=LIKE, which="largest_magnitude", tol=1e-12)
    assert got.values[0] == pytest.approx(-100.0)


def test_deflated_lanczos_searches_only_the_complement_even_when_the_rest_is_negative() -> None:
    a = _matrix()
    a = a - 60 * torch.eye(a.shape[0], dtype=torch.float64)  # every eigenvalue negative
    values, vectors = torch.linalg.eigh(a)
    b = vectors[:, -2:].T.contiguous()  # deflate the top two
    got = lanczos(lambda v: a @ v, a.shape[0], 2, like=LIKE, tol=1e-12, max_iter=120, deflate=b)
    np.testing.assert_allclose(got.values, values.flip(0)[2:4].numpy(), rtol=1e-10)
    assert torch.abs(got.vectors @ b.T).max() < 1e-12


def test_same_seed_same_result_other_seed_other_path() -> None:
    a = _matrix()
    one = lanczos(lambda v: a @ v, 120, 3, like=LIKE, seed=7)
    two = lanczos(lambda v: a @ v, 120, 3, like=LIKE, seed=7)
    assert torch.equal(one.vectors, two.vectors) and one.iterations == two.iterations
    assert hutchinson(lambda v: a @ v, 120, 30, like=LIKE, seed=3) == hutchinson(
        lambda v: a @ v, 120, 30, like=LIKE, seed=3
    )


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_trace_estimates_fall_within_three_standard_errors(estimator) -> None:  # type: ignore[no-untyped-def]
    a = _matrix(seed=4)
    for seed in range(5):
        est, err = estimator(lambda v: a @ v, a.shape[0], 60, like=LIKE, seed=seed)
        assert err > 0
        assert abs(est - float(a.trace())) <= 3 * err


def test_hutchpp_is_far_more_precise_on_a_low_rank_dominated_matrix() -> None:
    a = _matrix(seed=5)
    _, err_h = hutchinson(lambda v: a @ v, 120, 60, like=LIKE)
    _, err_pp = hutchpp(lambda v: a @ v, 120, 60, like=LIKE)
    assert err_pp < err_h / 3


def test_slq_weights_sum_to_one_and_recover_the_spectrum_moments() -> None:
    a = _matrix(n=60, seed=6)
    nodes, weights = slq(lambda v: a @ v, 60, 8, 60, like=LIKE)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-10)
    values = torch.linalg.eigvalsh(a).numpy()
    assert nodes.max() == pytest.approx(values.max(), rel=1e-8)  # full-length runs are exact
    second = float((weights * nodes**2).sum(axis=1).mean())
    assert second == pytest.approx(float((values**2).mean()), rel=0.5)


@pytest.mark.parametrize("max_iter", [8, 20, 120])
def test_free_residuals_equal_explicit_products_converged_or_not(max_iter: int) -> None:
    """The Arnoldi relation A Q = Q H + r eᵀ gives ‖A y − θ y‖ without multiplying by A."""
    a = _matrix()
    got = lanczos(lambda v: a @ v, a.shape[0], 4, like=LIKE, tol=1e-12, max_iter=max_iter)
    explicit = (got.vectors @ a - torch.from_numpy(got.values)[:, None] * got.vectors).norm(dim=1)
    np.testing.assert_allclose(got.residuals, explicit.numpy(), rtol=1e-6, atol=1e-12 * 50)
    if max_iter == 8:
        assert got.residuals.min() > 1e-3  # genuinely unconverged pairs are measured, not assumed


def test_free_residuals_hold_for_the_deflated_operator() -> None:
    a = _matrix()
    _, vectors = torch.linalg.eigh(a)
    b = vectors[:, -2:].T.contiguous()

    def deflated(v: torch.Tensor) -> torch.Tensor:
        v = v - b.T @ (b @ v)
        w: torch.Tensor = a @ v
        out: torch.Tensor = w - b.T @ (b @ w)
        return out

    got = lanczos(lambda v: a @ v, a.shape[0], 3, like=LIKE, tol=1e-12, max_iter=15, deflate=b)
    explicit = torch.stack([deflated(v) - lam * v for v, lam in zip(got.vectors, got.values, strict=True)])
    np.testing.assert_allclose(got.residuals, explicit.norm(dim=1).numpy(), rtol=1e-6, atol=1e-10)
