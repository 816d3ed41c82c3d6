"""The float32 floor of Lanczos residuals against parameter count (docs/hessian.md, "The float32 floor").

For GPTNeoX models of growing width (random weights, the addition task, 32 sequences; and the
demo's addition model trained for 600 steps, the "trained" row), the top
Hessian eigenpair is computed three ways: in float64 at tol 1e-12 (the truth), and in float32 run
for 80 steps at an unreachable tol (the floor it settles on). Printed per size: parameters n; the
float32 pair's residual ‖Hv − λv‖ / λ₁ (the floor); the float32 HVP's own error
‖H₃₂v − H₆₄v‖ / λ₁ on the true eigenvector; the float32 eigenvalue's and eigenvector's errors
against the truth; and ``precision_floor`` = eps₃₂·√n, the floor the converged flag allows.
Run: ``python benchmarks/hessian_floor.py WORKDIR`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from common import machine, table

from ckpt_analysis.config import DataSpec
from ckpt_analysis.curvature import HessianOperator, ParamLayout
from ckpt_analysis.data import load_eval_data
from ckpt_analysis.spectral import lanczos, precision_floor
from ckpt_analysis.tasks import arithmetic
from ckpt_analysis.zoo.demo import train_or_reuse
from ckpt_analysis.zoo.train import TrainConfig, tiny_gpt_neox

WIDTHS = (8, 16, 32, 64, 128)


def measure(model: torch.nn.Module) -> list[str]:
    sample = load_eval_data(
        DataSpec(source="addition", num_examples=32, seed=3),
        arithmetic.build_tokenizer(),
        max_positions=32,
        vocab_size=len(arithmetic.VOCAB),
    )
    ops = {}
    for dtype in (torch.float64, torch.float32):
        copy_ = copy.deepcopy(model).to(dtype)
        ops[dtype] = HessianOperator(copy_, ParamLayout.from_model(copy_, ["*"]), sample, batch_size=32)
    op64, op32 = ops[torch.float64], ops[torch.float32]
    like64, like32 = op64.flat_params(), op32.flat_params()
    truth = lanczos(op64, op64.n, 1, like=like64, tol=1e-12, max_iter=120)
    found = lanczos(op32, op32.n, 1, like=like32, tol=1e-12, max_iter=80)
    lam, v = float(truth.values[0]), truth.vectors[0]
    hvp_error = float((op32(v.float()).double() - op64(v)).norm()) / abs(lam)
    vector_error = abs(float(1 - abs(found.vectors[0].double() @ v)))
    return [
        f"{op64.n:,}",
        f"{found.residuals[0] / abs(lam):.2e}",
        f"{hvp_error:.2e}",
        f"{abs(found.values[0] - lam) / abs(lam):.1e}",
        f"{vector_error:.1e}",
        f"{precision_floor('float32', op32.n):.2e}",
    ]


def trained(workdir: Path) -> torch.nn.Module:
    """The demo's addition model after its 600 steps (trained into ``workdir/run`` once)."""
    from transformers import AutoModelForCausalLM

    train_or_reuse(workdir / "run", TrainConfig(device="cpu"))
    return AutoModelForCausalLM.from_pretrained(workdir / "run" / "checkpoint-600")


def main(workdir: Path) -> None:
    vocab = len(arithmetic.VOCAB)
    models = {
        f"random, width {w}": tiny_gpt_neox(vocab, hidden_size=w, num_layers=2, num_heads=2) for w in WIDTHS
    }
    models["trained demo model"] = trained(workdir)
    rows = [[name, *measure(model)] for name, model in models.items()]
    header = [
        "model",
        "n",
        "float32 residual / λ₁",
        "HVP error / λ₁",
        "|Δλ| / λ₁",
        "|1 − ⟨v₃₂, v⟩|",
        "precision_floor",
    ]
    print(machine(), "\n")
    print(table(header, rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="floor_out", type=Path)
    main(parser.parse_args().workdir)
