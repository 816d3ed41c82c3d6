"""Feature covariance cost vs the bare forward passes, and peak memory as tokens grow 4× (docs/benchmarks.md).

Run: ``python benchmarks/covariance.py`` (about 2 minutes on 2 cores); ``--standin`` times the
ratio on a Pythia stand-in instead (``--size 70m``: hidden 512, 6 layers, 32 × 128 tokens, about
5 minutes; ``410m``: hidden 1024, 24 layers, 8 × 128 tokens; random weights in float32),
``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import bare_forwards, build_run, machine, median_time, table

from ckpt_analysis.analyses.covariance import Covariance, CovarianceParams
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import ComputeSpec, DataSpec, JobSpec, LocalCheckpoints
from ckpt_analysis.data import EvalData
from ckpt_analysis.registry import Unit, UnitContext
from ckpt_analysis.zoo.standin import PYTHIA_SIZES

SEQ, LEN, BATCH = 128, 64, 32
STANDIN_SEQUENCES = {"70m": 32, "410m": 8, "1.4b": 32}
"""Sequences of 128 tokens per stand-in size: 410M's short on the CPU; on a GPU pass 1.4b."""


def _context(model: torch.nn.Module, sequences: int, length: int, batch: int) -> UnitContext:
    spec = LocalCheckpoints(source="local", path="unused", device="cpu")
    job = JobSpec(
        "bench",
        "unused",
        spec,
        DataSpec(source="addition"),
        {"covariance": {}},
        ComputeSpec(batch_size=batch),
    )
    vocab = int(model.config.vocab_size)
    ids = np.random.default_rng(0).integers(0, vocab, (sequences, length))
    ones = np.ones_like(ids, dtype=np.int8)
    data = EvalData(ids, ones, ones.astype(bool))
    return UnitContext(
        job, [], model.config.to_dict(), data, lambda i: model, lambda name, rows=slice(None): np.empty(0)
    )


def _load(run: Path) -> torch.nn.Module:
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(run), device="cpu"))
    return source.load(source.checkpoints()[0])


def _standin(device: str, size: str) -> torch.nn.Module:
    """The Pythia architecture of ``size`` with random weights, in float32."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_SIZES[size])).eval()
    return torch.nn.Module.to(model, device)


def _bare_forward(ctx: UnitContext) -> None:
    model = ctx.load_model(0)
    batches = ctx.eval_data.batches(ctx.job.compute.batch_size, model.device)
    bare_forwards(model, ((ids, attn) for ids, attn, _ in batches))


SITE_SETS = (["resid_post"], ["resid_pre", "resid_post"], ["resid_pre", "attn_out", "mlp_out", "resid_post"])


def time_ratio(ctx: UnitContext, *, threads: int, site_sets: tuple[list[str], ...], repeats: int = 9) -> None:
    """Median over interleaved (bare forward, covariance) pairs of their time ratio."""
    torch.set_num_threads(threads)
    data = ctx.eval_data
    unit = Unit("covariance", "step=0", checkpoint=0)
    print(
        f"{data.input_ids.size} tokens ({data.input_ids.shape[0]} × {data.input_ids.shape[1]}), batch "
        f"{ctx.job.compute.batch_size}, positions = all, torch threads {threads}; "
        f"median of {repeats} interleaved pairs\n"
    )
    rows = []
    for sites in site_sets:
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
    ctx = _context(_load(Path(run)), sequences, LEN, BATCH)
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--standin", action="store_true", help="a Pythia stand-in (see --size)")
    parser.add_argument("--size", default="70m", choices=sorted(STANDIN_SEQUENCES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved (forward, covariance) pairs")
    args = parser.parse_args()
    print(machine(), "\n")
    if args.standin:
        ctx = _context(_standin(args.device, args.size), STANDIN_SEQUENCES[args.size], 128, 16)
        time_ratio(ctx, threads=torch.get_num_threads(), site_sets=SITE_SETS, repeats=args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run = build_run(Path(tmp) / "run", 1)
            time_ratio(
                _context(_load(run), SEQ, LEN, BATCH), threads=1, site_sets=(SITE_SETS[0], SITE_SETS[2])
            )
            memory(run)
