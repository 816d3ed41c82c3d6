"""The measured floor of Lanczos residuals from 2k to 70M parameters (docs/hessian.md, "The measured floor").

For each model, the top-10 Hessian eigenpairs are found in float32 at the analysis defaults
(``tol`` = 1e-4 of each pair's own eigenvalue), then every returned pair's residual is recomputed
with float64 products of a float64 copy of the model (the truth). Printed per model: parameters n;
Lanczos steps; the largest measured floor, reported residual and float64 residual, each over the
pair's own |λ|; the largest ratio float64 / reported residual (the bar: ≤ 2); the pairs flagged
converged and the pairs truly within 1e-4·|λ|; the float32 product's own error on the returned
vectors, ‖H₃₂y − H₆₄y‖ / |λ|, and the range of the rounding Lanczos measured for them
(``HessianOperator.rounding``, one batch against float64, scaled) over that error (≥ 1: the flag
errs on the safe side); and, for comparison, the worst-case bound 2·eps₃₂·√n (relative to
λ₁) that the stopping rule used before the floor was measured.

Models: random GPTNeoX of widths 16 and 64, the demo's addition model trained for 600 steps
(256 sequences in 8 batches of 32, as the peers benchmark), a random GPTNeoX of about 1M parameters, and the
Pythia-70M stand-in's architecture with random weights on 8 random sequences of 64 tokens, cut
at 30 Lanczos steps (a random model's clustered spectrum needs ~100, 27 GB of Lanczos vectors
at this size): its flags show the rule's honesty at a cut-off.
Run: ``python benchmarks/hessian_floor.py WORKDIR [--skip-70m | --only-70m]`` (about 15 minutes on 2 cores,
most of it the 70M row).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from common import machine, table

from ckpt_analysis.config import DataSpec
from ckpt_analysis.curvature import HessianOperator, ParamLayout, _eval_data
from ckpt_analysis.data import EvalData, load_eval_data
from ckpt_analysis.spectral import lanczos
from ckpt_analysis.tasks import arithmetic
from ckpt_analysis.zoo.demo import train_or_reuse
from ckpt_analysis.zoo.standin import PYTHIA_70M
from ckpt_analysis.zoo.train import TrainConfig, tiny_gpt_neox

TOP, GOAL, MAX_70M = 10, 1e-4, 30


def addition(sequences: int) -> EvalData:
    return load_eval_data(
        DataSpec(source="addition", num_examples=sequences, seed=3),
        arithmetic.build_tokenizer(),
        max_positions=64,
        vocab_size=len(arithmetic.VOCAB),
    )


def measure(model: torch.nn.Module, sample: EvalData, batch_size: int, *, max_iter: int = 200) -> list[str]:
    ops = {}
    for dtype in (torch.float32, torch.float64):
        copy_ = torch.nn.Module.to(copy.deepcopy(model), dtype)
        layout = ParamLayout.from_model(copy_, ["*"])
        ops[dtype] = HessianOperator(copy_, layout, sample, batch_size=batch_size)
    op32, op64 = ops[torch.float32], ops[torch.float64]
    like, rounding = op32.flat_params(), op32.rounding
    found = lanczos(op32, op32.n, TOP, like=like, tol=GOAL, max_iter=max_iter, rounding=rounding)
    lam = np.abs(found.values)
    estimate = op32.rounding(found.vectors, found.values) * lam
    truth, product = [], []
    for value, y in zip(found.values, found.vectors, strict=True):
        exact = op64(y.double())
        truth.append(float((exact - value * y.double()).norm()))
        product.append(float((op32(y).double() - exact).norm()))
    true = np.array(truth) / lam
    return [
        f"{op32.n:,}",
        str(found.iterations),
        f"{(found.floors / lam).max():.1e}",
        f"{(found.residuals / lam).max():.1e}",
        f"{true.max():.1e}",
        f"{(true * lam / found.residuals).max():.2f}",
        f"{int(found.converged.sum())}/{TOP}",
        f"{int((true <= GOAL).sum())}/{TOP}",
        f"{(np.array(product) / lam).max():.1e}",
        f"{(estimate / np.array(product)).min():.1f}–{(estimate / np.array(product)).max():.1f}",
        f"{2 * torch.finfo(torch.float32).eps * np.sqrt(op32.n):.1e}",
    ]


def trained(workdir: Path) -> torch.nn.Module:
    """The demo's addition model after its 600 steps (trained into ``workdir/run`` once)."""
    from transformers import AutoModelForCausalLM

    train_or_reuse(workdir / "run", TrainConfig(device="cpu"))
    return AutoModelForCausalLM.from_pretrained(workdir / "run" / "checkpoint-600")


def pythia_70m() -> tuple[torch.nn.Module, EvalData]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_70M))
    ids = torch.randint(0, PYTHIA_70M["vocab_size"], (8, 64), generator=torch.Generator().manual_seed(0))
    return model, _eval_data(ids)


def main(workdir: Path, *, small_rows: bool, big_row: bool) -> None:
    rows = []
    if small_rows:
        vocab = len(arithmetic.VOCAB)
        small = addition(64)
        for width in (16, 64):
            model = tiny_gpt_neox(vocab, hidden_size=width, num_layers=2, num_heads=2)
            rows.append(_row(f"random, width {width}", measure(model, small, 64)))
        rows.append(_row("the demo's addition model, trained", measure(trained(workdir), addition(256), 32)))
        wide = tiny_gpt_neox(vocab, hidden_size=208, num_layers=2, num_heads=4)
        rows.append(_row("random, width 208", measure(wide, small, 64)))
    if big_row:
        model, ids = pythia_70m()
        cells = measure(model, ids, 8, max_iter=MAX_70M)  # its Lanczos vectors take 280 MB each
        rows.append(_row(f"Pythia-70M architecture, random ({MAX_70M} steps)", cells))
    header = [
        "model",
        "n",
        "steps",
        "floor / |λ|",
        "reported / |λ|",
        "float64 / |λ|",
        "float64 / reported",
        "flagged",
        "truly ≤ 1e-4",
        "product error / |λ|",
        "measured / product error",
        "old bound 2·eps·√n",
    ]
    print(machine(), "\n")
    print(table(header, rows))


def _row(name: str, cells: list[str]) -> list[str]:
    print(name, *cells, sep=" | ", flush=True)  # each row as it lands: the 70M row takes minutes
    return [name, *cells]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="floor_out", type=Path)
    parser.add_argument("--skip-70m", action="store_true", help="leave out the Pythia-70M row")
    parser.add_argument("--only-70m", action="store_true", help="only the Pythia-70M row")
    args = parser.parse_args()
    main(args.workdir, small_rows=not args.only_70m, big_row=not args.skip_70m)
