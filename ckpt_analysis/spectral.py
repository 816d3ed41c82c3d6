"""Spectral methods for symmetric operators: Lanczos, Hutchinson, Hutch++, SLQ (docs/hessian.md)"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]
Which = Literal["largest_algebraic", "largest_magnitude"]


@dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs from Lanczos, with explicit residuals ``‖A v − λ v‖`` and each pair's measured
    floor (the part of its residual that rounding in the products leaves, docs/hessian.md, "The
    measured floor")."""

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    floors: np.ndarray
    converged: np.ndarray
    iterations: int
    matvecs: int


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rademacher(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(like)


def _tridiagonal(alpha: list[float], beta: list[float]) -> tuple[np.ndarray, np.ndarray]:
    m = len(alpha)
    t = np.diag(alpha) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
    return np.linalg.eigh(t)


def _pick(theta: np.ndarray, k: int, which: Which) -> np.ndarray:
    key = theta if which == "largest_algebraic" else np.abs(theta)
    return np.argsort(-key, kind="stable")[:k]


@dataclass(frozen=True)
class _Ritz:
    """The wanted Ritz pairs of a Krylov space: values θ, coefficients s (columns, y = Q s), the
    residuals ‖A y − θ y‖, their measured floors ‖(H − M) s‖ and the part more steps can remove,
    ‖r‖ |s_m| (docs/hessian.md, "Eigenpairs" and "The measured floor")."""

    values: np.ndarray
    coefficients: np.ndarray
    floors: np.ndarray
    reducible: np.ndarray

    @property
    def residuals(self) -> np.ndarray:
        """√(floor² + reducible²) (docs/hessian.md, "Eigenpairs")."""
        return np.asarray(np.hypot(self.floors, self.reducible))


@dataclass(frozen=True)
class _Krylov:
    """What Lanczos steps leave: the tridiagonal (``alpha``, ``beta``), the Lanczos vectors Q (rows),
    and the Arnoldi relation they satisfy to the rounding of the vector arithmetic, A Q = Q H + r e_mᵀ.

    H = ``projections`` holds every coefficient full reorthogonalisation removed (so it is T plus
    the rounding Lanczos would otherwise lose), and ``remainder`` = ‖r‖, the part of the last
    product outside span(Q).
    """

    alpha: list[float]
    beta: list[float]
    basis: _Rows
    projections: np.ndarray
    remainder: float

    def rayleigh(self) -> np.ndarray:
        """M = QᵀAQ as the products measured it: H's upper triangle (every qᵢᵀ A qⱼ, i ≤ j, that
        reorthogonalisation computed) mirrored below (docs/hessian.md, "Eigenpairs")."""
        upper = np.triu(self.projections)
        mirrored: np.ndarray = upper + np.triu(upper, 1).T
        return mirrored

    def ritz(self, k: int, which: Which) -> _Ritz:
        """The top-``k`` Rayleigh–Ritz pairs of M and their residuals, with no product by A.

        A y − θ y = Q (H s − θ s) + s_m r with M s = θ s and r ⊥ span(Q), so the residual is
        √(‖(H − M) s‖² + (s_m ‖r‖)²): H − M is the products' asymmetry, which no further step
        removes (the floor), and s_m ‖r‖ is what further steps reduce.
        """
        theta, s = np.linalg.eigh(self.rayleigh())
        top = _pick(theta, k, which)
        theta, s = theta[top], s[:, top]
        floors = np.linalg.norm(self.projections @ s - s * theta, axis=0)
        reducible = self.remainder * np.abs(s[-1])
        return _Ritz(theta, s, floors, reducible)


class _Rows:
    """The Lanczos vectors Q, stored in blocks of ``BLOCK`` rows so that memory follows the steps
    taken, not the step limit (200 rows of Pythia-70M are 56 GB), and growing copies nothing."""

    BLOCK = 16

    def __init__(self, first: torch.Tensor) -> None:
        self._blocks: list[torch.Tensor] = []
        self._count = 0
        self.append(first)

    def append(self, row: torch.Tensor) -> None:
        if self._count % self.BLOCK == 0:
            self._blocks.append(row.new_zeros(self.BLOCK, row.numel()))
        self._blocks[-1][self._count % self.BLOCK] = row
        self._count += 1

    def _filled(self) -> list[torch.Tensor]:
        used = self._count - self.BLOCK * (len(self._blocks) - 1)
        return [*self._blocks[:-1], self._blocks[-1][:used]]

    def __getitem__(self, j: int) -> torch.Tensor:
        return self._blocks[j // self.BLOCK][j % self.BLOCK]

    def remove_from(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q w, w − Qᵀ Q w): one classical Gram–Schmidt pass against every row."""
        blocks = self._filled()
        parts = [block @ w for block in blocks]
        for block, c in zip(blocks, parts, strict=True):
            w = w - block.T @ c
        return torch.cat(parts), w

    def combine(self, coefficients: np.ndarray) -> torch.Tensor:
        """The rows of ``coefficientsᵀ Q``: ``coefficients`` is (rows of Q, vectors)."""
        out = self._blocks[0].new_zeros(coefficients.shape[1], self._blocks[0].shape[1])
        start = 0
        for block in self._filled():
            part = torch.from_numpy(coefficients[start : start + len(block)].T.copy()).to(block)
            out += part @ block
            start += len(block)
        return out


def _lanczos_steps(
    op: Matvec,
    start: torch.Tensor,
    limit: int,
    *,
    stop: Callable[[_Krylov], bool],
    project: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> _Krylov:
    """Up to ``limit`` Lanczos steps with full reorthogonalisation.

    ``stop(krylov)`` is asked after each step with the space built so far.
    """
    basis = _Rows(start / start.norm())
    projections = np.zeros((limit + 1, limit))
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(limit):
        w = op(basis[j])
        alpha.append(float(w @ basis[j]))
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            c, w = basis.remove_from(w)
            projections[: j + 1, j] += c.double().cpu().numpy()
        w = project(w)
        b = float(w.norm())
        scale = max(abs(a) for a in alpha) or 1.0
        krylov = _Krylov(alpha, beta, basis, projections[: j + 1, : j + 1], b)
        if j + 1 == limit or stop(krylov) or b <= 1e3 * np.finfo(np.float64).eps * scale:
            return krylov
        beta.append(b)
        projections[j + 1, j] = b
        basis.append(w / b)
    raise ValueError("Lanczos needs at least one step")


def lanczos(
    matvec: Matvec,
    n: int,
    k: int,
    *,
    like: torch.Tensor,
    which: Which = "largest_algebraic",
    tol: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    deflate: torch.Tensor | None = None,
    rounding: Callable[[torch.Tensor, np.ndarray], float] | None = None,
) -> Eigenpairs:
    """Top-``k`` eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    docs/hessian.md, "Eigenpairs" and "The measured floor". Deterministic for a given ``seed``.
    With ``deflate`` (rows: an orthonormal B) the operator is Π⊥ A Π⊥ with Π⊥ = I − BᵀB, and the
    search is restricted to range(Π⊥): the start vector and every Lanczos vector are projected
    out of span(B), so the zero eigenvalues on span(B) never compete. A pair converges when its
    residual is ≤ ``tol`` · |θ|, its own eigenvalue. Iteration stops once every wanted pair has
    converged or has reached its measured floor (more steps would not lower its residual), or at
    ``max_iter``. ``rounding`` (``CurvatureOperator.rounding``) measures the products' own
    rounding error on the final Ritz vectors; it is added to each residual and floor before the
    pair is flagged, so a flag never trusts a product more than it deserves. ``like`` fixes dtype
    and device.
    """

    def project(x: torch.Tensor) -> torch.Tensor:
        return x if deflate is None else x - deflate.T @ (deflate @ x)

    def op(x: torch.Tensor) -> torch.Tensor:
        return project(matvec(project(x)))

    rho: float | None = None  # the products' relative rounding error, once measured

    def settled(krylov: _Krylov) -> bool:
        nonlocal rho
        pairs = krylov.ritz(k, which)
        if len(pairs.values) < k or not _settled(pairs, tol, rho or 0.0):
            return False
        if rounding is None or rho is not None:
            return True
        rho = rounding(krylov.basis.combine(pairs.coefficients).to(like), pairs.values)
        return _settled(pairs, tol, rho)

    limit = min(max_iter, n - (0 if deflate is None else deflate.shape[0]))
    start = project(torch.randn(n, generator=_generator(seed)).to(like))
    krylov = _lanczos_steps(op, start, limit, stop=settled, project=project)
    pairs = krylov.ritz(k, which)
    vectors = krylov.basis.combine(pairs.coefficients).to(like)
    if rounding is not None and rho is None:  # stopped before every pair settled
        rho = rounding(vectors, pairs.values)
    error = (rho or 0.0) * np.abs(pairs.values)
    residuals, floors = pairs.residuals + error, pairs.floors + error
    converged = residuals <= tol * np.abs(pairs.values)
    steps = len(krylov.alpha)
    return Eigenpairs(pairs.values, vectors, residuals, floors, converged, steps, steps)


def _settled(pairs: _Ritz, tol: float, rounding: float) -> bool:
    """Whether more steps would not help: each pair's reducible residual is within ``tol`` · |θ|
    less its rounding error ``rounding`` · |θ|, or within its floor (docs/hessian.md, "Eigenpairs"
    and "The measured floor")."""
    scale = np.abs(pairs.values)
    return bool(np.all(pairs.reducible <= np.maximum((tol - rounding) * scale, pairs.floors)))


def hutchinson(
    matvec: Matvec, n: int, probes: int, *, like: torch.Tensor, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson's estimate ``mean zᵀAz`` over Rademacher ``z``, and its standard error (docs/hessian.md)"""
    gen = _generator(seed)
    samples = np.array([float(z @ matvec(z)) for z in _rademacher((probes, n), gen, like)])
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(probes))


def hutchpp(matvec: Matvec, n: int, probes: int, *, like: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Hutch++ (Meyer et al. 2021) with ``probes`` matvecs in all, and its standard error (docs/hessian.md).

    A third of the budget sketches the top range Q of A exactly (``tr QᵀAQ``); the last third runs
    Hutchinson on (I − QQᵀ)A(I − QQᵀ), whose sample spread gives the standard error.
    """
    third = max(probes // 3, 2)
    gen = _generator(seed)
    sketch = torch.stack([matvec(s) for s in _rademacher((third, n), gen, like)], dim=1)
    q, _ = torch.linalg.qr(sketch)
    exact = float(sum(q[:, i] @ matvec(q[:, i]) for i in range(q.shape[1])))
    g = _rademacher((third, n), gen, like)
    g = g - (g @ q) @ q.T
    samples = np.array([float(z @ matvec(z)) for z in g])
    return exact + float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(third))


def slq(
    matvec: Matvec, n: int, probes: int, steps: int, *, like: torch.Tensor, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature (docs/hessian.md): per probe, up to ``steps`` Ritz nodes and weights.

    The spectral density is ``(1/probes) Σ_probe Σ_i weight_i δ(x − node_i)``; the weights of one
    probe sum to 1 (squared first components of the tridiagonal's eigenvectors). A probe whose run
    ends early is padded with weight 0.
    """
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(probes):
        start = _rademacher((n,), _generator(seed + p), like)
        krylov = _lanczos_steps(matvec, start, min(steps, n), stop=lambda krylov: False)
        theta, s = _tridiagonal(krylov.alpha, krylov.beta)
        nodes[p, : len(theta)], weights[p, : len(theta)] = theta, s[0] ** 2
    return nodes, weights
