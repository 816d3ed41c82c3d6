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
    """Ritz pairs from Lanczos, with explicit residuals ``‖A v − λ v‖``."""

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
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
class _Krylov:
    """What Lanczos steps leave: the tridiagonal (``alpha``, ``beta``), the Lanczos vectors Q (rows),
    and the Arnoldi relation they satisfy exactly, A Q = Q H + r e_mᵀ.

    H = ``projections`` holds every coefficient full reorthogonalisation removed (so it is T plus
    the rounding Lanczos would otherwise lose), and ``remainder`` = ‖r‖, the part of the last
    product outside span(Q).
    """

    alpha: list[float]
    beta: list[float]
    basis: torch.Tensor
    projections: np.ndarray
    remainder: float

    def residuals(self, theta: np.ndarray, s: np.ndarray) -> np.ndarray:
        """‖A y − θ y‖ for the Ritz pairs y = Q s, with no product by A (docs/hessian.md, "Eigenpairs").

        A y − θ y = Q (H s − θ s) + s_m r, and r ⊥ span(Q), so the norm is
        √(‖H s − θ s‖² + (s_m ‖r‖)²).
        """
        inside = np.linalg.norm(self.projections @ s - s * theta, axis=0)
        return np.asarray(np.hypot(inside, self.remainder * s[-1]))


def _lanczos_steps(
    op: Matvec,
    start: torch.Tensor,
    limit: int,
    *,
    stop: Callable[[list[float], list[float], float], bool],
    project: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> _Krylov:
    """Up to ``limit`` Lanczos steps with full reorthogonalisation.

    ``stop(alpha, beta, b)`` is asked after each step, ``b`` being the next off-diagonal.
    """
    basis = torch.zeros(limit + 1, start.numel(), dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()
    projections = np.zeros((limit + 1, limit))
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(limit):
        w = op(basis[j])
        alpha.append(float(w @ basis[j]))
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            c = basis[: j + 1] @ w
            w = w - basis[: j + 1].T @ c
            projections[: j + 1, j] += c.double().cpu().numpy()
        w = project(w)
        b = float(w.norm())
        scale = max(abs(a) for a in alpha) or 1.0
        if j + 1 == limit or stop(alpha, beta, b) or b <= 1e3 * np.finfo(np.float64).eps * scale:
            break
        beta.append(b)
        projections[j + 1, j] = b
        basis[j + 1] = w / b
    m = len(alpha)
    return _Krylov(alpha, beta, basis[:m], projections[:m, :m], b)


FLOOR_FACTOR = 2.0
"""The working-precision floor of a residual, in units of eps·√n (docs/hessian.md, "The float32 floor")."""


def precision_floor(dtype: str | torch.dtype, n: int) -> float:
    """The smallest relative residual (‖Av − θv‖ / max|θ|) an ``n``-dimensional operator evaluated
    in ``dtype`` can be asked for: ``FLOOR_FACTOR · eps(dtype) · √n`` (docs/hessian.md, "The
    float32 floor"; measured by ``benchmarks/hessian_floor.py``)."""
    eps = torch.finfo(dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)).eps
    return FLOOR_FACTOR * eps * float(np.sqrt(n))


def lanczos(
    matvec: Matvec,
    n: int,
    k: int,
    *,
    like: torch.Tensor,
    which: Which = "largest_algebraic",
    tol: float = 1e-6,
    max_iter: int = 200,
    seed: int = 0,
    deflate: torch.Tensor | None = None,
) -> Eigenpairs:
    """Top-``k`` eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    docs/hessian.md. Deterministic for a given ``seed``. With ``deflate`` (rows: an orthonormal B) the
    operator is Π⊥ A Π⊥ with Π⊥ = I − BᵀB, and the search is restricted to range(Π⊥): the start
    vector and every Lanczos vector are projected out of span(B), so the zero eigenvalues on
    span(B) never compete. A pair converges when its residual is ≤ ``tol`` · max|θ|, where ``tol``
    is raised to the working precision's floor (:func:`precision_floor` of ``like``'s dtype) when
    it asks for less than rounding allows. ``like`` fixes dtype and device.
    """
    tol = max(tol, precision_floor(like.dtype, n))

    def project(x: torch.Tensor) -> torch.Tensor:
        return x if deflate is None else x - deflate.T @ (deflate @ x)

    def op(x: torch.Tensor) -> torch.Tensor:
        return project(matvec(project(x)))

    def converged(alpha: list[float], beta: list[float], b: float) -> bool:
        theta, s = _tridiagonal(alpha, beta)
        top = _pick(theta, k, which)
        return len(top) == k and bool(np.all(b * np.abs(s[-1, top]) <= tol * np.abs(theta).max()))

    limit = min(max_iter, n - (0 if deflate is None else deflate.shape[0]))
    start = project(torch.randn(n, generator=_generator(seed)).to(like))
    krylov = _lanczos_steps(op, start, limit, stop=converged, project=project)
    theta, s = _tridiagonal(krylov.alpha, krylov.beta)
    top = _pick(theta, k, which)
    vectors = torch.from_numpy(s[:, top].T.copy()).to(like) @ krylov.basis
    residuals = krylov.residuals(theta[top], s[:, top])
    scale = float(np.abs(theta).max())
    steps = len(krylov.alpha)
    return Eigenpairs(theta[top], vectors, residuals, residuals <= tol * scale, steps, steps)


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
        krylov = _lanczos_steps(matvec, start, min(steps, n), stop=lambda a, b, c: False)
        theta, s = _tridiagonal(krylov.alpha, krylov.beta)
        nodes[p, : len(theta)], weights[p, : len(theta)] = theta, s[0] ** 2
    return nodes, weights
