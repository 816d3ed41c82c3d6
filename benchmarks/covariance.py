"""Feature covariance cost vs the bare forward passes, and peak memory as tokens grow 4× (docs/benchmarks.md).

Run: ``python benchmarks/covariance.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import build_run, machine, median_time, table

from ckpt_analysis.analyses.covariance import Covariance, CovarianceParams
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import CheckpointsSpec, ComputeSpec, DataSpec, JobSpec
from ckpt_analysis.data import EvalData
from ckpt_analysis.registry import Unit, UnitContext

SEQ, LEN, BATCH = 128, 64, 32


def _context(run: Path, sequences: int) -> UnitContext:
    spec = CheckpointsSpec(source="local", path=str(run), device="cpu")
    job = JobSpec(
        "bench",
        "unused",
        spec,
        DataSpec(source="addition"),
        {"covariance": {}},
        ComputeSpec(batch_size=BATCH),
    )
    source = CheckpointSource.from_spec(spec)
    ckpts = source.checkpoints()
    model = source.load(ckpts[0])
    ids = np.random.default_rng(0).integers(0, 512, (sequences, LEN))
    ones = np.ones_like(ids, dtype=np.int8)
    data = EvalData(ids, ones, ones.astype(bool))
    return UnitContext(
        job, ckpts, model.config.to_dict(), data, lambda i: model, lambda name, rows=slice(None): np.empty(0)
    )


def _bare_forward(ctx: UnitContext) -> None:
    model = ctx.load_model(0)
    with torch.inference_mode():
        for start in range(0, SEQ, BATCH):
            ids = torch.from_numpy(ctx.eval_data.input_ids[start : start + BATCH])
            model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))


def time_ratio(run: Path, repeats: int = 9) -> None:
    """Median over interleaved (bare forward, covariance) pairs of their time ratio."""
    torch.set_num_threads(1)
    ctx = _context(run, SEQ)
    unit = Unit("covariance", "step=0", checkpoint=0)
    print(
        f"{SEQ * LEN} tokens, batch {BATCH}, positions = all, torch threads 1; "
        f"median of {repeats} interleaved pairs\n"
    )
    rows = []
    for sites in (["resid_post"], ["resid_pre", "attn_out", "mlp_out", "resid_post"]):
        for gram in ("float64", "float32"):
            params = CovarianceParams(sites=sites, positions="all", gram_dtype=gram)  # type: ignore[arg-type]
            analysis = Covariance(params)
            pairs = [
                (
                    median_time(lambda: _bare_forward(ctx), 1),
                    median_time(lambda a=analysis: a.compute(unit, ctx), 1),
                )
                for _ in range(repeats)
            ]
            bare, cov = (float(np.median(x)) for x in zip(*pairs, strict=True))
            ratio = float(np.median([c / b for b, c in pairs]))
            rows.append([str(len(sites)), gram, f"{bare:.3f}", f"{cov:.3f}", f"{ratio:.2f}×", "≤ 1.3×"])
    print(table(["sites", "gram dtype", "forward s", "covariance s", "ratio", "bar"], rows))


def _peak_child(run: Path, sequences: int) -> dict[str, float]:
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); from covariance import _peak_run;"
        "print(json.dumps(_peak_run(sys.argv[1], int(sys.argv[2]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run), str(sequences)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _peak_run(run: str, sequences: int) -> dict[str, float]:
    torch.set_num_threads(1)
    ctx = _context(Path(run), sequences)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Covariance(CovarianceParams(positions="all")).compute(Unit("covariance", "s", checkpoint=0), ctx)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data_mb = ctx.eval_data.input_ids.nbytes * 2 / 2**20
    return {"before": before, "peak": peak, "data_mb": data_mb}


def memory(run: Path) -> None:
    small, large = _peak_child(run, 256), _peak_child(run, 1024)
    rows = [
        [str(seqs * LEN), f"{r['peak']:.0f}", f"{r['peak'] - r['before']:.0f}", f"{r['data_mb']:.1f}"]
        for seqs, r in ((256, small), (1024, large))
    ]
    print("\n" + table(["tokens", "peak RSS MB", "growth during compute MB", "token arrays MB"], rows))
    print(f"\npeak RSS ratio at 4× tokens: {large['peak'] / small['peak']:.3f}× (bar ≤ 1.1×)")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(Path(tmp) / "run", 1)
        print(machine(), "\n")
        time_ratio(run)
        memory(run)
