"""What the crc32c chunk checksums cost (docs/benchmarks.md, "Checksums").

Two stores of one covariance job (a random GPTNeoX, hidden 256, 4 layers, 4 sites; 6 checkpoints;
8.4 MB of results per unit) side by side: one as the toolkit writes it, one whose result arrays
have the checksum codec removed before any unit runs (as a store made before checksums). Measured
in one run, interleaved: the median covariance unit wall time over 3 forced reruns of each store
(bar: ≤ 1.03×); the median of 300 `ca.read` calls of one (step, site, layer) matrix (bar: ≤ 1.10×);
and `verify`'s throughput on the checksummed store (bar: ≥ 0.5 GB/s on one core).
Run: ``python benchmarks/checksums.py [WORKDIR]`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import build_run, covariance_job, machine, table, unit_times

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.run import run_job
from ckpt_analysis.store import read
from ckpt_analysis.verify import verify_store

STEPS = 6


def _strip_checksums(store: Path) -> None:
    """Drop the crc32c codec from every array no unit has written yet (and from the consolidated
    metadata), as a store made before checksums."""
    root = json.loads((store / "zarr.json").read_text())
    consolidated = root["consolidated_metadata"]["metadata"]
    for meta in store.glob("*/zarr.json"):
        name = meta.parent.name
        raw = json.loads(meta.read_text())
        if raw.get("node_type") != "array" or (meta.parent / "c").exists():
            continue
        raw["codecs"] = [c for c in raw["codecs"] if c["name"] != "crc32c"]
        meta.write_text(json.dumps(raw))
        consolidated[name]["codecs"] = raw["codecs"]
    (store / "zarr.json").write_text(json.dumps(root))


def _read_time(store: Path, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        read(store, "act_cov", step=(i % STEPS) * 1, site="mlp_out", layer=i % 4)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    run = build_run(workdir / "run", STEPS)
    jobs = {
        kind: job_from_dict(covariance_job(run, workdir / f"{kind}.zarr"), base=workdir)
        for kind in ("crc", "plain")
    }
    for kind, job in jobs.items():
        prepare_store(job, force=True)
        if kind == "plain":
            _strip_checksums(Path(job.output))
    units: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(3):
        for kind, job in jobs.items():
            assert all(o.ok for o in run_job(job, force=True))
            units[kind] += unit_times(Path(job.output))
    reads = {k: [] for k in jobs}  # type: dict[str, list[float]]
    for _ in range(5):
        for kind, job in jobs.items():
            reads[kind].append(_read_time(Path(job.output), 60))
    report = verify_store(jobs["crc"].output)
    unit = {k: statistics.median(v) for k, v in units.items()}
    one = {k: statistics.median(v) for k, v in reads.items()}
    rows = [
        [
            "covariance unit (s)",
            f"{unit['plain']:.3f}",
            f"{unit['crc']:.3f}",
            f"{unit['crc'] / unit['plain']:.3f}×",
            "≤ 1.03×",
        ],
        [
            "`ca.read` of one 256×256 matrix (ms)",
            f"{one['plain'] * 1e3:.3f}",
            f"{one['crc'] * 1e3:.3f}",
            f"{one['crc'] / one['plain']:.3f}×",
            "≤ 1.10×",
        ],
    ]
    print(machine(), "\n")
    print(table(["what", "no checksum", "crc32c", "ratio", "bar"], rows))
    rate = report.bytes / report.seconds / 1e9
    size = f"{report.files} chunk files, {report.bytes / 1e6:.1f} MB in {report.seconds:.3f} s"
    print(f"\nverify: {size} = {rate:.2f} GB/s (bar ≥ 0.5)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="checksum_out", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    main(args.workdir.resolve())
