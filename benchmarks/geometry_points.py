"""Cost of sequence-level intrinsic dimension (issue 22): a geometry unit per point kind.

On TRACE's grammar scale (128 sequences × 32 scored positions × width 64, a 2-layer GPTNeoX, 2
layers of ``resid_post``) it runs ``geometry`` with ``points = "token"`` (2000 sampled tokens),
``"sequence"`` (each sequence flattened to 32 × 64 = 2048 dimensions) and ``"mean"`` on the same
checkpoints, then both token and sequence points in one job (``points = ["token", "sequence"]``,
as jobs/trace_parity.toml measures them), and prints each setting's median seconds per unit (from
the sidecars) and the difference to the token kind: the bar is that sequence points add at most
2 s per unit.

Run: ``python benchmarks/geometry_points.py`` (about a minute on 2 cores). ``--memory`` measures
the streamed sequence points instead: one sequence-point unit (128 sequences × 512 scored
positions, hidden 256, 4 layers: 537 MB of float64 activations whole) at ``sequence_memory_mb``
of 1024 (one pass), 64 and 16, each in a fresh process, with its peak RSS and seconds from the
sidecar, beside the same process with 3 token points (the floor: imports, model, data; about
5 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import build_run, machine, table, write_ids

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.run import run_job
from ckpt_analysis.zoo.train import tiny_gpt_neox

CHECKPOINTS, SEQUENCES, LENGTH, VOCAB = 6, 128, 33, 256
KINDS: tuple[str | list[str], ...] = ("token", "sequence", "mean", ["token", "sequence"])


def unit_seconds(store: Path) -> list[float]:
    """Each finished geometry unit's wall time, from its sidecar."""
    sidecars = (json.loads(p.read_text()) for p in (store / "_units").glob("geometry__*.json"))
    return [s["wall_s"] for s in sidecars if s["status"] == "done"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for step in range(CHECKPOINTS):
            tiny_gpt_neox(VOCAB, seed=step).save_pretrained(tmp / "run" / f"checkpoint-{step}")
        data = write_ids(tmp / "ids.jsonl", sequences=SEQUENCES, length=LENGTH, vocab=VOCAB)
        rows, medians = [], {}
        for kind in KINDS:
            name = kind if isinstance(kind, str) else " + ".join(kind)
            raw = {
                "name": f"geometry-{len(rows)}",
                "output": str(tmp / f"{len(rows)}.zarr"),
                "checkpoints": {"source": "local", "path": str(tmp / "run")},
                "data": {"source": "dataset", "path": str(data), "ids_column": "ids", "seq_len": LENGTH}
                | {"token_text": False},
                "analyses": {"geometry": {"points": kind, "sample_sequences": SEQUENCES}},
                "compute": {"workers": 1, "batch_size": SEQUENCES},
            }
            assert all(o.ok for o in run_job(job_from_dict(raw, base=tmp)))
            seconds = unit_seconds(tmp / f"{len(rows)}.zarr")
            medians[name] = statistics.median(seconds)
            rows.append([name, str(len(seconds)), f"{medians[name]:.3f}"])
        for row in rows:
            row.append(f"{medians[row[0]] - medians['token']:+.3f}")
        print(machine())
        print(table(["points", "units", "s / unit (median)", "vs token"], rows))


MEMORY_SEQUENCES, MEMORY_LENGTH, BUDGETS_MB = 128, 513, (1024.0, 64.0, 16.0)


def memory_unit(tmp: Path, budget_mb: float) -> None:
    """One sequence-point geometry unit at ``budget_mb`` (0: 3 token points instead), in this
    process; prints its sidecar."""
    raw = {
        "name": "geometry-memory",
        "output": str(tmp / f"{budget_mb}.zarr"),
        "checkpoints": {"source": "local", "path": str(tmp / "run")},
        "data": {"source": "dataset", "path": str(tmp / "ids.jsonl"), "ids_column": "ids"}
        | {"seq_len": MEMORY_LENGTH, "token_text": False},
        "analyses": {
            "geometry": {"points": "sequence", "sample_sequences": MEMORY_SEQUENCES}
            | ({"sequence_memory_mb": budget_mb} if budget_mb else {"points": "token", "sample_tokens": 3})
        },
        "compute": {"executor": "inprocess", "batch_size": 16, "torch_threads": 2},
    }
    assert all(o.ok for o in run_job(job_from_dict(raw, base=tmp)))
    (sidecar,) = (tmp / f"{budget_mb}.zarr" / "_units").glob("geometry__*.json")
    print(sidecar.read_text())


def memory() -> None:
    """Peak RSS and seconds of one sequence-point unit per budget, each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_run(tmp / "run", 1, max_positions=MEMORY_LENGTH)
        write_ids(tmp / "ids.jsonl", sequences=MEMORY_SEQUENCES, length=MEMORY_LENGTH)
        rows = []
        for budget in (0.0, *BUDGETS_MB):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-unit", str(budget), str(tmp)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            record = json.loads(out[out.index("{") :])
            name = f"{budget:g}" if budget else "— (3 token points)"
            rows.append([name, f"{record['peak_rss_mb']:.0f}", f"{record['wall_s']:.1f}"])
        print(machine())
        print(table(["sequence_memory_mb", "peak RSS MB", "s / unit"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory", action="store_true", help="streamed sequence points' peak memory")
    parser.add_argument("--memory-unit", nargs=2, metavar=("MB", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_unit:
        memory_unit(Path(args.memory_unit[1]), float(args.memory_unit[0]))
    else:
        memory() if args.memory else main()
