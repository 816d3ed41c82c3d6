"""Output diagnostics against a direct per-token computation from the logits, and label means."""

from pathlib import Path

import numpy as np
import torch
from builders import build_local_run, job_dict

from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.plan import make_plan
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results


def _direct(logits: np.ndarray, target: int) -> list[float]:
    """One token's diagnostics from its logits, by hand in numpy."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    return [
        -np.log(p[target]),
        -(p * np.log(p)).sum(),
        p.max(),
        float(order[0] == target),
        float(np.flatnonzero(order == target)[0]),  # no ties among random float logits
    ]


def test_diagnostics_equal_a_direct_computation_from_logits_with_means_per_label(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10])
    job = job_from_dict(
        job_dict(run, tmp_path / "d.zarr", analyses={"diagnostics": {}}, data={"num_examples": 20}),
        base=tmp_path,
    )
    assert all(o.ok for o in run_job(job))
    ds = open_results(job.output)
    data = make_plan(job).eval_data
    source = CheckpointSource.from_spec(job.checkpoints)
    model = source.load(source.checkpoints()[1])
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data.input_ids)).logits.numpy()
    seq, pos = data.token_index
    rows = zip(seq.tolist(), pos.tolist(), strict=True)
    expected = np.array([_direct(logits[s, p - 1], int(data.input_ids[s, p])) for s, p in rows])
    got = ds.diag_token.isel(step=1).values
    assert ds.diag_metric.values.tolist() == ["loss", "entropy", "top1_prob", "correct", "target_rank"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    carry = ds.label_carry.values
    for j, level in enumerate(ds.carry_value.values):
        mean = expected[carry == level].mean(axis=0)
        np.testing.assert_allclose(ds.diag_by_carry.isel(step=1).values[:, j], mean, rtol=1e-5, atol=1e-6)
    assert ds.place_value.values.tolist() == [0, 1, 2, 3]
    assert np.isfinite(ds.diag_by_place.values).all()
