"""lt_alignment per checkpoint with the prediction targets shared (one ``lt_alignment/targets``
unit per job) against the code before that change (targets recomputed in every unit).

Needs the 8-revision stand-in cache of ``pythia_standin.py --sweep`` in WORKDIR. Run it once with
this checkout and once with the older code on the path, and compare the medians:
``git worktree add ../before a5624a2^``, then
``PYTHONPATH=../before python benchmarks/lt_shared_targets.py WORKDIR before.zarr`` and
``python benchmarks/lt_shared_targets.py WORKDIR after.zarr`` (about 2 minutes each on 2 cores).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.run import run_job

REVISIONS = ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64"]


def main(work: Path, out: Path) -> None:
    job = {
        "name": "lt-shared-targets",
        "output": str(out),
        "checkpoints": {
            "source": "hub",
            "repo": "EleutherAI/pythia-70m",
            "select": REVISIONS,
            "cache_dir": str(work / "hub"),
            "dtype": "float32",
            "device": "cpu",
        },
        "data": {
            "source": "dataset",
            "path": str(work / "ids.jsonl"),
            "ids_column": "ids",
            "token_text": False,
        },
        "analyses": {"corpus_stats": {"vocab_size": 2000}, "token_cov": {}, "lt_alignment": {}},
        "compute": {"executor": "inprocess", "torch_threads": 2, "batch_size": 16},
    }
    outcomes = run_job(job_from_dict(job, base=work))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    walls = {
        r["unit"]: r["wall_s"] for r in (json.loads(f.read_text()) for f in (out / "_units").glob("*.json"))
    }
    per = [w for unit, w in walls.items() if unit.startswith("lt_alignment/step=")]
    targets = walls.get("lt_alignment/targets")
    print(
        f"lt_alignment per checkpoint: median {statistics.median(per):.2f} s over {len(per)} units; ", end=""
    )
    print("targets unit: " + (f"{targets:.2f} s once" if targets else "none (recomputed in every unit)"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
