"""POLCA projection costs (docs/benchmarks.md, "POLCA projections").

1. Projections P for N tokens and K directions: forward mode (one JVP per direction, all tokens)
   vs per-token reverse mode (one backward per token, then B·g); values must agree.
2. Cost per checkpoint relative to K plain forward passes: first order, and with exact c.

The choice of second-order variant is measured over seeds and spacings by
``benchmarks/polca_variants.py``. Run: ``python benchmarks/polca.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import machine, median_time, table

from ckpt_analysis.attention import differentiable_attention
from ckpt_analysis.batching import CPU_VECTORS
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import DataSpec, LocalCheckpoints
from ckpt_analysis.curvature import ParamLayout
from ckpt_analysis.data import EvalData, load_eval_data
from ckpt_analysis.directional import directional_derivatives
from ckpt_analysis.losses import scored_token_losses
from ckpt_analysis.zoo.train import TrainConfig, train_arithmetic

PROBLEMS, K, STEPS, EVERY = 250, 16, 320, 20
PER_PASS, PASS_SIZES = CPU_VECTORS, (1, 4, 8, 16)  # the CPU default, and those compared


def reverse_mode(model: torch.nn.Module, data: EvalData, directions: torch.Tensor) -> torch.Tensor:
    """The per-token baseline: one backward pass per scored token."""
    params = list(model.parameters())
    batch = [torch.from_numpy(a) for a in (data.input_ids, data.attention_mask, data.score_mask)]
    with differentiable_attention(model):
        losses = scored_token_losses(model, *batch)
        rows = []
        for i in range(len(losses)):
            grads = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < len(losses))
            rows.append(directions @ torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows, dim=1)


def plain_forwards(model: torch.nn.Module, data: EvalData, count: int) -> None:
    ids, mask = torch.from_numpy(data.input_ids), torch.from_numpy(data.attention_mask)
    with torch.no_grad(), differentiable_attention(model):
        for _ in range(count):
            model(input_ids=ids, attention_mask=mask)


def costs(run: Path) -> None:
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(run), device="cpu"))
    ckpt = source.checkpoints()[-1]
    model = source.load(ckpt)
    data = load_eval_data(
        DataSpec(source="addition", num_examples=PROBLEMS, seed=99),
        source.tokenizer(ckpt),
        max_positions=64,
        vocab_size=model.config.vocab_size,
    )
    layout = ParamLayout.from_model(model, ["*"])
    gen = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(layout.size, K, generator=gen))[0].T.contiguous()
    size = PROBLEMS

    def forward_mode(second: bool = False, per_pass: int = PER_PASS) -> torch.Tensor:
        return directional_derivatives(
            model, layout, data, directions, batch_size=size, vectors_per_pass=per_pass, second=second
        ).first

    fwd = forward_mode()
    rev = reverse_mode(model, data, directions)
    err = float((fwd - rev).abs().max() / rev.abs().max())
    t_plain = median_time(lambda: plain_forwards(model, data, K), 5)
    t_rev = median_time(lambda: reverse_mode(model, data, directions), 3)
    rows = [["K plain forward passes", "", f"{t_plain:.3f}", "1×", ""]]
    first, second = {}, {}
    for per_pass in PASS_SIZES:
        first[per_pass] = median_time(lambda: forward_mode(per_pass=per_pass), 5)  # noqa: B023
        second[per_pass] = median_time(lambda: forward_mode(True, per_pass), 3)  # noqa: B023
    for name, times, bar in (
        ("first order (K JVPs)", first, "≤ 3×"),
        ("exact c (forward-over-forward)", second, "≤ 6×"),
    ):
        for per_pass, t in times.items():
            rows.append(
                [
                    name,
                    str(per_pass),
                    f"{t:.3f}",
                    f"{t / t_plain:.2f}× K forwards",
                    bar if per_pass == PER_PASS else "",
                ]
            )
    rows.insert(
        1,
        [
            "per-token reverse mode",
            "",
            f"{t_rev:.2f}",
            f"{t_rev / first[PER_PASS]:.1f}× slower than forward",
            "≥ 20×",
        ],
    )
    print(
        f"{data.num_tokens} scored tokens ({PROBLEMS} sequences), K = {K} directions, "
        f"{layout.size} parameters, float32, torch threads 1\n"
    )
    print(table(["computation", "vectors per pass", "s", "ratio", "bar"], rows))
    print(f"\nmax |forward − reverse| / max |reverse| = {err:.1e} (bar: 1e-5)\n")


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        accuracy = train_arithmetic(tmp / "run", TrainConfig(steps=STEPS, save_every=EVERY))
        print(machine(), "\n")
        print(
            f"demo model: GPTNeoX hidden 64, 2 layers, trained {STEPS} steps "
            f"(answer accuracy {accuracy:.2f})\n"
        )
        costs(tmp / "run")


if __name__ == "__main__":
    main()
