"""Cost of sequence-level intrinsic dimension (issue 22): a geometry unit per point kind.

On TRACE's grammar scale (128 sequences × 32 scored positions × width 64, a 2-layer GPTNeoX, 2
layers of ``resid_post``) it runs ``geometry`` with ``points = "token"`` (2000 sampled tokens),
``"sequence"`` (each sequence flattened to 32 × 64 = 2048 dimensions) and ``"mean"`` on the same
checkpoints, then both token and sequence points in one job (``points = ["token", "sequence"]``,
as jobs/trace_parity.toml measures them), and prints each setting's median seconds per unit (from
the sidecars) and the difference to the token kind: the bar is that sequence points add at most
2 s per unit.

Run: ``python benchmarks/geometry_points.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from common import machine, table, write_ids

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


if __name__ == "__main__":
    main()
