"""Every example Pythia job (jobs/pythia_*.toml) runs offline, end to end, on a CI-sized stand-in.

The stand-in keeps what the job names (repo, Pythia revision names and their steps, analyses and
their modes, sites, sequence length, batch size, workers) and shrinks only sizes: a 6-layer GPT-NeoX
of width 32 with Pythia's parallel residual and fp16 weights, the first 8 of the job's revisions, a
few sequences of text, and the iteration and vocabulary knobs in ``_SMALLER``.
"""

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import cli

from ckpt_analysis.checkpoints import PYTHIA_TOKENS_PER_STEP, CheckpointSource
from ckpt_analysis.config import load_job, to_toml
from ckpt_analysis.store import open_results, store_meta, unit_states
from ckpt_analysis.tasks.topics import words
from ckpt_analysis.zoo.standin import PYTHIA_70M, pythia_standin

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("pythia_*.toml"))
REVISIONS = 8
SEQUENCES = 12
TINY_PYTHIA = {
    **PYTHIA_70M,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
_SMALLER: dict[str, dict[str, int]] = {
    "corpus_stats": {"vocab_size": 64},
    "hessian": {"max_iter": 8, "trace_probes": 3, "sample_sequences": 4},
}
"""Per analysis: options lowered to these values where the job sets them higher."""


def _text_file(path: Path, *, documents: int = 2 * SEQUENCES, length: int = 300) -> Path:
    """Documents of words the stand-in's tokenizer knows, one ``{"text": ...}`` per line."""
    vocabulary = words(int(TINY_PYTHIA["vocab_size"]))
    rng = np.random.default_rng(0)
    lines = [
        json.dumps({"text": " ".join(vocabulary[i] for i in rng.zipf(1.3, length) % len(vocabulary))})
        for _ in range(documents)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def ci_sized(job_file: Path, tmp: Path) -> tuple[Path, list[str]]:
    """The job at CI size, written to ``tmp``; returns the job file and the revisions it runs."""
    raw: dict[str, Any] = tomllib.loads(job_file.read_text())
    revisions = [
        c.revision for c in CheckpointSource.from_spec(load_job(job_file).checkpoints).checkpoints()
    ][:REVISIONS]
    pythia_standin(tmp / "hub", revisions, repo=raw["checkpoints"]["repo"], config=TINY_PYTHIA)
    raw["output"] = str(tmp / "store.zarr")
    raw["checkpoints"] |= {"cache_dir": str(tmp / "hub"), "select": revisions}
    raw["data"] |= {"path": str(_text_file(tmp / "text.jsonl")), "num_sequences": SEQUENCES}
    for name, options in raw["analyses"].items():
        for key, value in _SMALLER.get(name, {}).items():
            if key in options:
                options[key] = min(options[key], value)
    job = tmp / job_file.name
    job.write_text(to_toml(raw))
    return job, revisions


@pytest.mark.parametrize("job_file", JOBS, ids=[p.stem for p in JOBS])
def test_pythia_job_prefetches_estimates_and_runs_offline_on_its_stand_in(
    job_file: Path, tmp_path: Path
) -> None:
    job, revisions = ci_sized(job_file, tmp_path)

    fetched = cli("prefetch", job)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert f"{len(revisions)} revisions cached, 0 missing" in fetched.stdout
    estimate = cli("plan", job, "--estimate")
    assert estimate.returncode == 0, estimate.stdout + estimate.stderr
    assert all(name in estimate.stdout for name in load_job(job).analyses), estimate.stdout
    ran = cli("run", job)
    assert ran.returncode == 0, ran.stdout + ran.stderr

    store = tmp_path / "store.zarr"
    states = unit_states(store)
    assert states and all(u.state == "done" for u in states), [u for u in states if u.state != "done"]
    assert {u["analysis"] for u in store_meta(store)["units"]} == set(load_job(job).analyses)
    results = open_results(store)
    steps = [int(r.removeprefix("step")) for r in revisions]
    assert results["step"].values.tolist() == steps
    assert results["tokens_seen"].values.tolist() == [s * PYTHIA_TOKENS_PER_STEP for s in steps]
    for name, variable in results.data_vars.items():
        if variable.dtype.kind == "f" and variable.size:
            assert np.isfinite(variable.values).any(), f"{name} holds no finite value"
