"""POLCA scaling (docs/polca.md): time against tokens, basis size and checkpoints; memory against checkpoints.

1. Forward-mode projections (first order) on one checkpoint of the demo-sized addition model:
   time against the number of scored tokens N at K = 16, and against the basis size K at N = 1000.
2. Whole POLCA jobs (``token_loss`` + ``polca`` on a 16-vector axis basis, in-process) over
   C = 8, 16 and 32 checkpoints: wall time, and the peak resident memory of the process.

Run: ``python benchmarks/polca_scaling.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, median_time, table

from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import DataSpec, LocalCheckpoints
from ckpt_analysis.curvature import ParamLayout
from ckpt_analysis.data import load_eval_data
from ckpt_analysis.directional import directional_derivatives
from ckpt_analysis.zoo.train import TrainConfig, train_arithmetic

TOKENS = (250, 500, 1000, 2000)
BASIS = (4, 8, 16, 32)
CHECKPOINTS = (8, 16, 32)


def projection_time(run: Path, problems: int, k: int) -> tuple[int, float]:
    """(scored tokens, median seconds) of K first-order JVPs over ``problems`` addition problems."""
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(run), device="cpu"))
    ckpt = source.checkpoints()[-1]
    model = source.load(ckpt)
    spec = DataSpec(source="addition", num_examples=problems, seed=99)
    data = load_eval_data(spec, source.tokenizer(ckpt), max_positions=64, vocab_size=model.config.vocab_size)
    layout = ParamLayout.from_model(model, ["*"])
    gen = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(layout.size, k, generator=gen))[0].T.contiguous()
    seconds = median_time(
        lambda: directional_derivatives(model, layout, data, directions, batch_size=problems), 3
    )
    return data.num_tokens, seconds


JOB_SCRIPT = """
import re, sys, time
from pathlib import Path
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.run import run_job
run, out, select = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
raw = {{
    "name": "scaling", "output": str(out),
    "checkpoints": {{"source": "local", "path": run, "select": select}},
    "data": {{"source": "addition", "num_examples": 250, "seed": 99}},
    "analyses": {{
        "hessian_basis": {{"steps": [0], "k": 1, "random": False, "axis": 16, "sample_sequences": 32}},
        "token_loss": {{}},
        "polca": {{"bases": ["axis"]}},
    }},
    "compute": {{"executor": "inprocess", "batch_size": 250}},
}}
start = time.perf_counter()
outcomes = run_job(job_from_dict(raw, base=out.parent))
assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
wall = time.perf_counter() - start
peak = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
print(wall, int(peak) / 1024)
"""


def job_run(run: Path, tmp: Path, checkpoints: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a fresh process running the POLCA job on ``checkpoints``."""
    select = f"0:{20 * (checkpoints - 1)}"
    args = [sys.executable, "-c", JOB_SCRIPT.format(), str(run), str(tmp / f"c{checkpoints}.zarr"), select]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    wall, peak = out.stdout.split()[-2:]
    return float(wall), float(peak)


def main() -> None:
    torch.set_num_threads(1)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        train_arithmetic(tmp / "run", TrainConfig(steps=620, save_every=20))
        print(f"(trained the demo model with 32 checkpoints in {time.perf_counter() - start:.0f} s)")
        rows = []
        for problems in (t // 4 for t in TOKENS):
            n, s = projection_time(tmp / "run", problems, 16)
            rows.append([f"N = {n}, K = 16", f"{s:.3f}", f"{1e6 * s / (n * 16):.1f}"])
        for k in BASIS:
            n, s = projection_time(tmp / "run", 250, k)
            rows.append([f"N = {n}, K = {k}", f"{s:.3f}", f"{1e6 * s / (n * k):.1f}"])
        print("\n1. forward-mode projections, first order, one checkpoint (median of 3)\n")
        print(table(["size", "s", "µs per token·vector"], rows))
        rows = []
        for c in CHECKPOINTS:
            wall, peak = job_run(tmp / "run", tmp, c)
            rows.append([str(c), f"{wall:.1f}", f"{wall / c:.2f}", f"{peak:.0f}"])
        print("\n2. POLCA jobs in-process (token_loss + polca, 16-vector axis basis, 1000 tokens)\n")
        print(table(["checkpoints", "wall s", "s per checkpoint", "peak RSS MiB"], rows))


if __name__ == "__main__":
    main()
