"""Per-unit cost on the Pythia-70M stand-in: what `plan --estimate` predicts for each analysis.

Builds a Hub cache of ``EleutherAI/pythia-70m`` at three Pythia revision names with the real
architecture and random float16 weights (``ckpt_analysis.zoo.standin``), a pre-tokenized corpus of
256 × 129 random ids (33K tokens), and one job with ``covariance`` (resid_pre, resid_post),
``corpus_stats`` + ``lt_alignment`` (K = 2000, activations mode) and ``token_cov`` (factor form),
then prints ``estimate()``'s table: every analysis's first unit run once here (a calibration).
Run: ``python benchmarks/pythia_standin.py [WORKDIR] [--device cpu|cuda]`` (about 5 minutes on
2 CPU cores; the cache takes 0.4 GB).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import machine, table, write_ids

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.estimate import device_name, estimate
from ckpt_analysis.zoo.standin import PYTHIA_70M, pythia_standin

REVISIONS = ["step0", "step1000", "step143000"]


def job(workdir: Path, device: str) -> dict[str, object]:
    return {
        "name": "pythia-70m-standin",
        "output": str(workdir / "standin.zarr"),
        "checkpoints": {
            "source": "hub",
            "repo": "EleutherAI/pythia-70m",
            "select": REVISIONS,
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


def main(workdir: Path, device: str) -> None:
    if not (workdir / "hub").is_dir():
        pythia_standin(workdir / "hub", REVISIONS)
    vocab = int(PYTHIA_70M["vocab_size"])
    if not (workdir / "ids.jsonl").is_file():
        write_ids(workdir / "ids.jsonl", sequences=256, length=129, vocab=vocab)
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
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    main(args.workdir.resolve(), args.device)
