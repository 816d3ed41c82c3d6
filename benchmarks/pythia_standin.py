"""Per-unit cost on the Pythia stand-ins (70M, 410M, 1.4B): what `plan --estimate` predicts, and
the cost of the 154-revision sweep.

Builds a Hub cache of ``EleutherAI/pythia-<size>`` at Pythia revision names with the real
architecture and random float16 weights (``ckpt_analysis.zoo.standin``), a pre-tokenized corpus of
random ids (256 × 129 by default), and one job with the analyses of ``jobs/pythia_*.toml``:
``covariance`` (resid_pre, resid_post, every position), ``corpus_stats`` + ``lt_alignment``
(K = 2000, activations mode, LayerNorm folded), ``token_cov`` (factor form) and, with
``--hessian``, ``hessian`` (layer 5's attention, k = 5, 100 Lanczos steps, 30 trace probes). It
prints ``estimate()``'s table: each analysis's first two units run here (the second timed, warm;
the first's extra time reported once), peak host and device memory, store MB per unit, and the
projected wall time of the 154-revision sweep on one worker.

Run: ``python benchmarks/pythia_standin.py [WORKDIR] [--size 70m|410m|1.4b] [--device cpu|cuda]
[--sequences N] [--hessian]``. On 2 CPU cores: 70M about 2 minutes (the cache takes 0.4 GB);
410M with ``--sequences 16`` about 6 minutes (a 2.5 GB cache). ``--sweep`` checks the estimate
instead: the same job over 8 revisions, predicted by calibration, then run, then predicted vs
measured per-unit time and store size per analysis (bar: within 25 %; 70M about 10 minutes, a
1.1 GB cache).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from common import bare_forwards, machine, median_time, table, write_ids

from ckpt_analysis.analyses.leading_terms import TOKEN_BATCH
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import JobSpec, job_from_dict
from ckpt_analysis.estimate import Estimate, device_name, estimate, sweep_seconds
from ckpt_analysis.plan import make_plan
from ckpt_analysis.registry import build_analyses
from ckpt_analysis.run import run_job
from ckpt_analysis.zoo.standin import PYTHIA_SIZES, pythia_standin

REVISIONS = ["step0", "step1000", "step143000"]
SWEEP = ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64"]
PYTHIA_REVISIONS = 154
HESSIAN = {
    "params": ["gpt_neox.layers.5.attention.*"],
    "k": 5,
    "sample_sequences": 32,
    "max_iter": 100,
    "trace_probes": 30,
}


def _repo(size: str) -> str:
    return f"EleutherAI/pythia-{size}"


def job(
    workdir: Path,
    device: str,
    revisions: list[str] = REVISIONS,
    store: str = "standin",
    *,
    size: str = "70m",
    hessian: bool = False,
) -> dict[str, object]:
    analyses: dict[str, object] = {
        "covariance": {"sites": ["resid_pre", "resid_post"], "positions": "all"},
        "corpus_stats": {"vocab_size": 2000},
        "token_cov": {},
        "lt_alignment": {"mode": "activations", "fold_ln": True},
    }
    return {
        "name": f"pythia-{size}-standin",
        "output": str(workdir / f"{store}-{size}.zarr"),
        "checkpoints": {
            "source": "hub",
            "repo": _repo(size),
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
        "analyses": analyses | ({"hessian": HESSIAN} if hessian else {}),
        "compute": {"workers": 1, "torch_threads": 2, "batch_size": 16},
    }


def _prepare(workdir: Path, revisions: list[str], *, size: str = "70m", sequences: int = 256) -> None:
    """The stand-in cache at ``revisions`` (only those missing are built) and the token set."""
    refs = workdir / "hub" / f"models--{_repo(size).replace('/', '--')}" / "refs"
    missing = [r for r in revisions if not (refs / r).is_file()]
    if missing:
        pythia_standin(workdir / "hub", missing, repo=_repo(size), config=PYTHIA_SIZES[size])
    ids = workdir / "ids.jsonl"
    if not ids.is_file() or len(ids.read_text().splitlines()) != sequences:
        write_ids(ids, sequences=sequences, length=129, vocab=int(PYTHIA_SIZES[size]["vocab_size"]))


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
    ran = sum(e.total_seconds or 0.0 for e in measured.values())
    guessed = sweep_seconds(list(predicted.values()), 1)
    print(f"\nwhole sweep, one worker: predicted {guessed:.1f} s, measured {ran:.1f} s (median × units)")


def _cell(value: float | None, scale: float = 1.0, digits: str = ".1f") -> str:
    return "—" if value is None else f"{value / scale:{digits}}"


def _sweep_hours(e: Estimate, revisions: int) -> float | None:
    """One worker's wall hours for the 154-revision sweep: an analysis's per-checkpoint units grow
    to 154, its job-level ones (``corpus_stats``, ``lt_alignment``'s targets) stay; the one-time
    costs once."""
    if e.seconds is None:
        return None
    units = e.units - revisions + PYTHIA_REVISIONS if e.units >= revisions else e.units
    return sweep_seconds([replace(e, units=units)], workers=1) / 3600


def bare_forward_seconds(spec: JobSpec, repeats: int = 3) -> dict[str, float]:
    """Median seconds of the bare decoder forwards (``model.base_model``, no hooks) over the tokens
    each analysis feeds, on the job's device: the corpus at the job's batch size (``covariance``),
    and the K vocabulary tokens as length-1 sequences in the analysis's batches (``token_cov``,
    ``lt_alignment``, docs/leading_terms.md). The floor the analyses are held to."""
    source = CheckpointSource.from_spec(spec.checkpoints)
    model = source.load(source.checkpoints()[-1])
    data, size = make_plan(spec).eval_data, int(spec.compute.batch_size)  # type: ignore[call-overload]
    device = next(model.parameters()).device
    vocab = torch.arange(int(spec.analyses["corpus_stats"]["vocab_size"]), device=device)[:, None]

    def timed(batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor | None]]]) -> float:
        bare_forwards(model, batches())  # warm
        return median_time(lambda: bare_forwards(model, batches()), repeats)

    corpus = timed(lambda: ((ids, attn) for ids, attn, _ in data.batches(size, device)))
    tokens = timed(lambda: ((vocab[i : i + TOKEN_BATCH], None) for i in range(0, len(vocab), TOKEN_BATCH)))
    return {"covariance": corpus, "token_cov": tokens, "lt_alignment": tokens}


def _ratio(e: Estimate, forwards: dict[str, float]) -> str:
    """A per-checkpoint unit's compute (its time less its checkpoint load) ÷ its bare forwards."""
    if e.seconds is None or e.analysis not in forwards:
        return "—"
    return f"{(e.seconds - (e.load_seconds or 0.0)) / forwards[e.analysis]:.2f}×"


def main(workdir: Path, device: str, *, size: str, sequences: int, hessian: bool) -> None:
    revisions = REVISIONS if size == "70m" else REVISIONS[:2]
    _prepare(workdir, revisions, size=size, sequences=sequences)
    spec = job_from_dict(job(workdir, device, revisions, size=size, hessian=hessian), base=workdir)
    torch.set_num_threads(int(spec.compute.torch_threads))
    forwards = bare_forward_seconds(spec)
    rows = [
        [
            e.analysis,
            _cell(e.seconds, digits=".2f"),
            _cell(e.load_seconds, digits=".2f"),
            _cell(e.startup_seconds, digits=".2f"),
            _cell(e.peak_rss_mb, 1024, ".2f"),
            _cell(e.gpu_peak_mb, 1024, ".2f"),
            f"{e.store_bytes / e.units / 1e6:.1f}",
            _cell(_sweep_hours(e, len(revisions)), digits=".3f"),
            _ratio(e, forwards),
            e.source,
        ]
        for e in estimate(spec)
    ]
    print(machine(), "\n")
    print(f"Pythia-{size} stand-in on {device_name(device)}; {sequences} sequences × 129 tokens\n")
    header = ["analysis", "s / unit", "of which load", "once", "peak RSS GiB", "peak GPU GiB"]
    header += ["store MB / unit", f"{PYTHIA_REVISIONS} revisions h", "÷ bare forwards", "from"]
    print(table(header, rows))
    print(
        f"\nbare forwards over the same tokens: the corpus (batch {spec.compute.batch_size}) "
        f"{forwards['covariance']:.3f} s, the K vocabulary tokens {forwards['token_cov']:.3f} s; bar ≤ 1.3×"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="standin_out", type=Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="70m", choices=list(PYTHIA_SIZES))
    parser.add_argument("--sequences", type=int, default=256, help="token set: sequences of 129 ids")
    parser.add_argument("--hessian", action="store_true", help="add jobs/pythia_hessian_subset.toml's")
    parser.add_argument("--sweep", action="store_true", help="check the estimate on an 8-revision sweep")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        sweep(args.workdir.resolve(), args.device)
    else:
        main(
            args.workdir.resolve(),
            args.device,
            size=args.size,
            sequences=args.sequences,
            hessian=args.hessian,
        )
