"""Hessian engine costs on the trained demo model (docs/benchmarks.md).

1. HVPs for the top-10 eigenpairs: Lanczos vs power iteration with deflation (PyHessian's
   algorithm), both run until every pair's residual ‖Hv − λv‖ ≤ tol · |λ₁|; also PyHessian's own
   stopping rule (relative eigenvalue change < 1e-3) and the residuals it leaves.
2. One HVP vs one gradient (wall-time ratio).
3. Wall time per basis vector of the ``hessian_basis`` chain.

Run: ``python benchmarks/hessian.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import machine, median_time, table

from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import DataSpec, LocalCheckpoints, job_from_dict
from ckpt_analysis.curvature import HessianOperator, ParamLayout
from ckpt_analysis.data import load_eval_data
from ckpt_analysis.run import run_job
from ckpt_analysis.spectral import Matvec, lanczos
from ckpt_analysis.zoo.train import TrainConfig, train_arithmetic

TOL, TOP = 1e-3, 10


def power_iteration(
    op: Matvec,
    n: int,
    k: int,
    *,
    like: torch.Tensor,
    tol: float,
    scale: float | None,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """PyHessian's deflated power iteration. ``scale`` set: stop on residual ≤ tol·scale;
    ``scale`` None: PyHessian's rule, relative change of λ < tol. Returns values, residuals, HVPs."""
    gen = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    values, residuals, hvps = [], [], 0
    for _ in range(k):
        w = torch.randn(n, generator=gen).to(like)
        lam_prev = None
        for _ in range(max_iter):
            for u in found:
                w = w - (w @ u) * u
            v = w / w.norm()
            w = op(v)
            hvps += 1
            lam = float(v @ w)
            residual = float((w - lam * v).norm())
            if scale is not None and residual <= tol * scale:
                break
            if scale is None and lam_prev is not None and abs(lam - lam_prev) / (abs(lam_prev) + 1e-6) < tol:
                break
            lam_prev = lam
        found.append(v)
        values.append(lam)
        residuals.append(residual)
    return np.array(values), np.array(residuals), hvps


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        accuracy = train_arithmetic(tmp / "run", TrainConfig())
        spec = LocalCheckpoints(source="local", path=str(tmp / "run"), device="cpu")
        source = CheckpointSource.from_spec(spec)
        ckpts = source.checkpoints()
        model = source.load(ckpts[-1])
        data = load_eval_data(
            DataSpec(source="addition", num_examples=64),
            source.tokenizer(ckpts[-1]),
            max_positions=64,
            vocab_size=model.config.vocab_size,
        )
        op = HessianOperator(model, ParamLayout.from_model(model, ["*"]), data, batch_size=64)
        like = op.flat_params()
        print(machine(), "\n")
        print(
            f"demo model: GPTNeoX hidden 64, 2 layers, {op.n} parameters, trained 600 steps "
            f"(answer accuracy {accuracy:.2f}); Hessian sample 64 sequences, float32, torch threads 1\n"
        )

        ritz = lanczos(op, op.n, TOP, like=like, which="largest_magnitude", tol=TOL, max_iter=400)
        scale = float(np.abs(ritz.values).max())
        p_vals, p_res, p_hvps = power_iteration(op, op.n, TOP, like=like, tol=TOL, scale=scale)
        h_vals, h_res, h_hvps = power_iteration(op, op.n, TOP, like=like, tol=1e-3, scale=None)

        def row(name: str, hvps: int, res: np.ndarray, vals: np.ndarray) -> list[str]:
            ok = int((res <= TOL * scale).sum())
            return [
                name,
                str(hvps),
                f"{res.max() / scale:.1e}",
                f"{ok}/{TOP}",
                f"{vals[0]:.3f} … {vals[-1]:.3f}",
            ]

        rows = [
            row("Lanczos (full reorth.)", ritz.matvecs, ritz.residuals, ritz.values),
            row("power iteration + deflation, same residual (≤ 1000 HVPs per pair)", p_hvps, p_res, p_vals),
            row("power iteration, PyHessian rule (Δλ/λ < 1e-3)", h_hvps, h_res, h_vals),
        ]
        print(f"Top {TOP} eigenpairs (largest magnitude), stopping at residual ≤ {TOL}·|λ₁|\n")
        print(table(["method", "HVPs", "max residual / |λ₁|", "pairs at tol", "eigenvalues"], rows))
        print(
            f"\nLanczos needs {p_hvps / ritz.matvecs:.1f}× fewer HVPs than power iteration aiming at the "
            f"same residual (a lower bound where it hit its cap), {h_hvps / ritz.matvecs:.1f}× fewer than "
            "PyHessian's looser default rule (bar ≥ 3×)\n"
        )

        v = torch.randn(op.n, generator=torch.Generator().manual_seed(1)).to(like)
        pairs = [(median_time(op.gradient, 1), median_time(lambda: op(v), 1)) for _ in range(9)]
        ratio = float(np.median([h / g for g, h in pairs]))
        grad_s, hvp_s = (float(np.median(x)) for x in zip(*pairs, strict=True))
        print(
            table(
                ["gradient s", "HVP s", "HVP / gradient", "bar"],
                [[f"{grad_s:.4f}", f"{hvp_s:.4f}", f"{ratio:.2f}×", "≤ 3×"]],
            )
        )

        raw = {
            "name": "basis",
            "output": str(tmp / "b.zarr"),
            "checkpoints": {"source": "local", "path": str(tmp / "run"), "select": "every=150"},
            "data": {"source": "addition", "num_examples": 64},
            "analyses": {"hessian_basis": {"k": 1, "random": False, "axis": 0}},
            "compute": {"executor": "inprocess", "batch_size": 64},
        }
        run_job(job_from_dict(raw, base=tmp))
        walls = [
            json.loads(p.read_text())["wall_s"] for p in sorted((tmp / "b.zarr" / "_units").glob("*.json"))
        ]
        print(
            f"\nhessian_basis, k = 1, default tol 1e-5: {len(walls)} links, median "
            f"{np.median(walls):.2f} s per basis vector (min {min(walls):.2f}, max {max(walls):.2f})"
        )


if __name__ == "__main__":
    main()
