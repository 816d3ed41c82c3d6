"""POLCA's per-(vector, checkpoint) cost against one forward plus one JVP over the same tokens.

Builds checkpoints of the POLCA paper's 9.5M-parameter GPT-2 (width 512, 3 layers, 4 heads, MLP
2048; random weights, each checkpoint a small step from the last), a K-vector ``hessian_basis``
from one cheap link (the vectors' values do not change the time), and runs the POLCA units twice,
side by side on the same store's inputs:

- ``now``: the defaults (the basis kept on the device for the worker, every vector through one
  pass over the data, ``vectors_per_pass = "auto"``), with ``store = []``;
- ``before``: the earlier behaviour emulated: the basis read from the store per unit in groups of
  4 (``basis_memory_mb`` of 4 vectors), one pass over the data per group, the Taylor predictions on.

Then, over the same tokens, batches and threads, times one plain forward (differentiable
attention, as the JVPs use) and one single-vector JVP (medians of ``--repeats``). Prints each
variant's warm POLCA unit (median over the units after the first), its load, its seconds per
vector and the ratio to (forward + JVP); the bar is ≤ 2×.

Run: ``python benchmarks/polca_unit.py WORKDIR [--problems 250] [--vectors 16] [--device cpu]``
(about 10 minutes on 2 cores at the defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from common import machine, median_time, table
from transformers.utils import logging as hf_logging

from ckpt_analysis.attention import differentiable_attention
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.curvature import ParamLayout
from ckpt_analysis.directional import directional_derivatives
from ckpt_analysis.plan import make_plan
from ckpt_analysis.run import run_job
from ckpt_analysis.store import read_sidecar
from ckpt_analysis.tasks import arithmetic
from ckpt_analysis.zoo.train import tiny_gpt2

CHECKPOINTS, SPACING, THREADS = 4, 20, 2


def build_paper_run(root: Path) -> int:
    """:data:`CHECKPOINTS` checkpoints of the paper's model in ``root``, each a random step of
    1e-3 relative; returns its parameter count."""
    tokenizer = arithmetic.build_tokenizer()
    model = tiny_gpt2(len(arithmetic.VOCAB), hidden_size=512, num_layers=3, num_heads=4, seed=0)
    gen = torch.Generator().manual_seed(1)
    for i in range(CHECKPOINTS):
        folder = root / f"checkpoint-{i * SPACING}"
        if not folder.is_dir():
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": i * SPACING}))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return sum(p.numel() for p in model.parameters())


def job(run: Path, output: Path, *, problems: int, vectors: int, device: str, before: int) -> dict[str, Any]:
    """The benchmark's job; ``before``: the parameter count, to emulate the earlier streaming
    (4 float32 vectors per group), or 0 for the defaults."""
    polca: dict[str, Any] = {"bases": ["hessian"], "second_order": "paper", "store": []}
    if before:
        polca |= {"basis_memory_mb": 4 * before * 4 / 2**20, "store": ["terms", "first", "second", "taylor"]}
    return {
        "name": "polca-unit",
        "output": str(output),
        "checkpoints": {"source": "local", "path": str(run), "device": device},
        "data": {"source": "addition", "num_examples": problems, "seed": 4321},
        "analyses": {
            "hessian_basis": {
                "k": vectors,
                "steps": [0],
                "sample_sequences": 8,
                "max_iter": vectors + 8,
                "tol": 1e-2,
            },
            "token_loss": {},
            "polca": polca,
        },
        "compute": {
            "executor": "inprocess",
            "torch_threads": THREADS,
            "vectors_per_pass": 4 if before else "auto",
        },
    }


def warm_units(store: Path) -> tuple[float, float]:
    """Median wall and load seconds of the POLCA units that have a following checkpoint, after the first."""
    records = [read_sidecar(store, f"polca/step={i * SPACING}") for i in range(1, CHECKPOINTS - 1)]
    done = [r for r in records if r is not None]
    return statistics.median(r["wall_s"] for r in done), statistics.median(r["load_s"] for r in done)


def references(spec: Any, repeats: int) -> tuple[float, float]:
    """Median seconds of one plain forward and of one single-vector JVP over the job's tokens."""
    plan = make_plan(spec)
    source = CheckpointSource.from_spec(spec.checkpoints)
    model = source.load(source.checkpoints()[1])
    data = plan.eval_data
    device = next(model.parameters()).device
    layout = ParamLayout.from_model(model, ["*"])
    direction = torch.randn(1, layout.size, device=device)

    def forward() -> None:
        with torch.no_grad(), differentiable_attention(model):
            for ids, mask, _ in data.batches(32, device):
                model(input_ids=ids, attention_mask=mask)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def jvp() -> None:
        directional_derivatives(model, layout, data, direction, batch_size=32, vectors_per_pass=1).first.cpu()

    return median_time(forward, repeats), median_time(jvp, repeats)


def main(workdir: Path, *, problems: int, vectors: int, device: str, repeats: int) -> None:
    hf_logging.disable_progress_bar()
    torch.set_num_threads(THREADS)
    run = workdir / "run"
    size = build_paper_run(run)
    rows, specs = [], {}
    for name in ("before", "now"):
        before = size if name == "before" else 0
        raw = job(
            run, workdir / f"{name}.zarr", problems=problems, vectors=vectors, device=device, before=before
        )
        specs[name] = job_from_dict(raw, base=workdir)
        assert all(o.ok for o in run_job(specs[name]))
    t_forward, t_jvp = references(specs["now"], repeats)
    floor = t_forward + t_jvp
    for name, spec in specs.items():
        wall, load = warm_units(Path(spec.output))
        per_vector = wall / vectors
        rows.append([name, f"{wall:.2f}", f"{load:.2f}", f"{per_vector:.3f}", f"{per_vector / floor:.2f}×"])
    print(machine(), "\n")
    tokens = make_plan(specs["now"]).eval_data.num_tokens
    print(
        f"{problems} problems ({tokens} scored tokens), K = {vectors}, device {device}; "
        f"one forward {t_forward:.3f} s, one JVP {t_jvp:.3f} s (medians of {repeats})\n"
    )
    print(table(["variant", "POLCA unit s", "of which load", "s per vector", "÷ (forward + JVP)"], rows))
    print("\nbar: ≤ 2× (forward + JVP) per (vector, checkpoint)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--problems", type=int, default=250)
    parser.add_argument("--vectors", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.workdir, problems=args.problems, vectors=args.vectors, device=args.device, repeats=args.repeats)
