"""Per-unit cost on the Pythia-70M stand-in: what `plan --estimate` predicts for each analysis.

Builds a Hub cache of ``EleutherAI/pythia-70m`` at three Pythia revision names with the real
architecture and random float16 weights (``ckpt_analysis.zoo.standin``), a pre-tokenized corpus of
256 × 129 random ids (33K tokens), and one job with ``covariance`` (resid_pre, resid_post),
``corpus_stats`` + ``lt_alignment`` (K = 2000, activations mode) and ``token_cov`` (factor form),
then prints ``estimate()``'s table: every analysis's first unit run once here (a calibration).
Run: ``python benchmarks/pythia_standin.py [WORKDIR] [--device cpu|cuda]`` (about 5 minutes on
2 CPU cores; the cache takes 0.4 GB). ``--sweep`` checks the estimate instead: the same job over
8 revisions, predicted by calibration, then run, then predicted vs measured per-unit time and
store size per analysis (bar: within 25 %; about 10 minutes, a 1.1 GB cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import machine, table, write_ids

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.estimate import device_name, estimate
from ckpt_analysis.plan import make_plan
from ckpt_analysis.registry import build_analyses
from ckpt_analysis.run import run_job
from ckpt_analysis.zoo.standin import PYTHIA_70M, pythia_standin

REVISIONS = ["step0", "step1000", "step143000"]
SWEEP = ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64"]


def job(
    workdir: Path, device: str, revisions: list[str] = REVISIONS, store: str = "standin"
) -> dict[str, object]:
    return {
        "name": "pythia-70m-standin",
        "output": str(workdir / f"{store}.zarr"),
        "checkpoints": {
            "source": "hub",
            "repo": "EleutherAI/pythia-70m",
            "select": revisions,
            "cache_dir": str(workdir / "hub"),
            "dtype": "float32",
            "device": device,
        },
        "data": {
            "source": "dataset",
            "path": str(workdir / "ids.jsonl"),
            "ids_column": "ids",
            "token_text": False,
        },
        "analyses": {
            "covariance": {"sites": ["resid_pre", "resid_post"]},
            "corpus_stats": {"vocab_size": 2000},
            "token_cov": {},
            "lt_alignment": {},
        },
        "compute": {"workers": 1, "torch_threads": 2, "batch_size": 16},
    }


def _prepare(workdir: Path, revisions: list[str]) -> None:
    if not all(
        (workdir / "hub" / "models--EleutherAI--pythia-70m" / "refs" / r).is_file() for r in revisions
    ):
        pythia_standin(workdir / "hub", revisions)
    if not (workdir / "ids.jsonl").is_file():
        write_ids(workdir / "ids.jsonl", sequences=256, length=129, vocab=int(PYTHIA_70M["vocab_size"]))


def sweep(workdir: Path, device: str) -> None:
    """Predicted (calibration) vs measured (the sweep's sidecars; the store's files) per analysis."""
    _prepare(workdir, SWEEP)
    spec = job_from_dict(job(workdir, device, SWEEP, "sweep"), base=workdir)
    predicted = {e.analysis: e for e in estimate(spec)}
    run_job(spec)
    measured = {e.analysis: e for e in estimate(spec, calibrate=False)}
    declared = {a.name: [v.name for v in a.variables(make_plan(spec).context)] for a in build_analyses(spec)}
    rows = []
    for name, guess in predicted.items():
        seen, files = measured[name], [f for v in declared[name] for f in (Path(spec.output) / v).rglob("*")]
        actual = sum(f.stat().st_size for f in files if f.is_file() and f.name != "zarr.json")
        rows.append(
            [
                name,
                f"{guess.seconds:.2f}" if guess.seconds else "—",
                f"{seen.seconds:.2f}" if seen.seconds else "—",
                f"{seen.seconds / guess.seconds:.2f}×" if guess.seconds and seen.seconds else "—",
                f"{guess.store_bytes / 1e6:.1f}",
                f"{actual / 1e6:.1f}",
                f"{actual / guess.store_bytes:.3f}×" if guess.store_bytes else "—",
            ]
        )
    print(machine(), "\n")
    print(f"Pythia-70M stand-in, {len(SWEEP)} revisions, on {device_name(device)}; bar: 0.75–1.25×\n")
    header = [
        "analysis",
        "predicted s/unit",
        "measured s/unit (median)",
        "ratio",
        "predicted MB",
        "store MB",
        "ratio",
    ]
    print(table(header, rows))


def main(workdir: Path, device: str) -> None:
    _prepare(workdir, REVISIONS)
    spec = job_from_dict(job(workdir, device), base=workdir)
    rows = [
        [
            e.analysis,
            f"{e.seconds:.1f}" if e.seconds else "—",
            f"{e.peak_rss_mb / 1024:.2f}" if e.peak_rss_mb else "—",
            f"{e.gpu_peak_mb / 1024:.2f}" if e.gpu_peak_mb else "—",
            f"{e.store_bytes / e.units / 1e6:.1f}",
            e.source,
        ]
        for e in estimate(spec)
    ]
    print(machine(), "\n")
    print(f"Pythia-70M stand-in on {device_name(device)}; 256 sequences × 129 tokens\n")
    header = ["analysis", "s / unit", "peak RSS GiB", "peak GPU GiB", "store MB / unit", "from"]
    print(table(header, rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="standin_out", type=Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sweep", action="store_true", help="check the estimate on an 8-revision sweep")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    (sweep if args.sweep else main)(args.workdir.resolve(), args.device)
