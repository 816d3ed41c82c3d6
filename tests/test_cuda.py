"""Every analysis on a GPU equals the same job on the CPU (float64), wherever CUDA is present.

Marked ``cuda``; skipped without a GPU. ``CKPT_ANALYSIS_TEST_DEVICE=cpu`` runs the same
comparison CPU against CPU, which checks the test itself on machines without one.
"""

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from builders import BATCH, build_local_run, job_dict, syncs_per_batch, tiny_model, unit_context

from ckpt_analysis.analyses.covariance import Covariance, CovarianceParams
from ckpt_analysis.analyses.diagnostics import Diagnostics, DiagnosticsParams
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.data import EvalData
from ckpt_analysis.registry import Analysis, Unit
from ckpt_analysis.run import run_job
from ckpt_analysis.sites import SITES, activations_at
from ckpt_analysis.store import open_results

DEVICE = os.environ.get("CKPT_ANALYSIS_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device here"),
]
SMALL: dict[str, Any] = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
ARITHMETIC = {
    "covariance": {"sites": ["resid_pre", "mlp_out", "resid_post"], "store_dtype": "float64"},
    "hessian": {"k": 3, "trace_probes": 8, "sample_sequences": 8, "dtype": "float64"},
    "geometry": {"sample_tokens": 60},
    "diagnostics": {},
    "hessian_basis": {"k": 1, "every": 10, "sample_sequences": 8, "dtype": "float64", "axis": 6},
    "token_loss": {},
    "polca": {"bases": ["hessian", "random", "axis"], "measure_all_variants": True},
}
LEADING_TERMS = {
    "corpus_stats": {"vocab_size": 8, "store_dtype": "float64"},
    "token_cov": {"form": "cov", "store_dtype": "float64"},
    "lt_alignment": {},
}


SOLVER_STATE = (
    "hessian_residual",
    "hessian_converged",
    "hessian_iterations",
    "basis_residual",
    "basis_converged",
)
"""Lanczos bookkeeping: a residual near 1e-9 may differ in every digit between devices (and with it
the step at which a pair counts as converged); the Ritz values and vectors themselves are compared."""


def _both(tmp_path: Path, analyses: dict[str, Any], data: dict[str, Any]) -> tuple[xr.Dataset, xr.Dataset]:
    run = build_local_run(tmp_path / "run", [0, 10, 20], seed=2, **SMALL)
    stores: list[xr.Dataset] = []
    for device in ("cpu", DEVICE):
        raw = job_dict(run, tmp_path / f"{device}-{len(stores)}.zarr", data=data)
        raw["analyses"] = analyses
        raw["checkpoints"] = {**raw["checkpoints"], "dtype": "float64", "device": device}
        job = job_from_dict(raw, base=tmp_path)
        assert all(o.ok for o in run_job(job)), device
        stores.append(open_results(job.output))
    return stores[0], stores[1]


def _assert_close(cpu: xr.Dataset, gpu: xr.Dataset) -> None:
    assert set(cpu.data_vars) == set(gpu.data_vars)
    for name in set(cpu.data_vars) - set(SOLVER_STATE):
        a, b = cpu[name].values, gpu[name].values
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)


def test_every_arithmetic_analysis_on_the_gpu_equals_the_cpu(tmp_path: Path) -> None:
    _assert_close(*_both(tmp_path, ARITHMETIC, {"num_examples": 16}))


def test_leading_terms_on_the_gpu_equal_the_cpu(tmp_path: Path) -> None:
    topics = {"source": "topics", "num_examples": 40, "seq_len": 12, "seed": 3}
    _assert_close(*_both(tmp_path, LEADING_TERMS, topics))


@pytest.mark.skipif(DEVICE != "cuda", reason="sync debug mode needs CUDA")
@pytest.mark.parametrize("analysis", ["covariance", "diagnostics", "activations_at"])
def test_batch_loops_add_no_host_device_synchronisation(analysis: str) -> None:
    model = torch.nn.Module.to(tiny_model(), DEVICE)
    unit = Unit(analysis, "step=0", checkpoint=0)

    units: dict[str, Analysis[Any]] = {
        "covariance": Covariance(CovarianceParams()),
        "diagnostics": Diagnostics(DiagnosticsParams()),
    }

    def run(data: EvalData) -> None:
        if analysis in units:
            units[analysis].compute(unit, unit_context(model, data, {}, batch_size=BATCH))
        else:
            mask, ids, attn = data.score_mask, data.input_ids, data.attention_mask
            activations_at(model, SITES, ids, attn, mask, batch_size=BATCH, dtype=torch.float32)

    assert syncs_per_batch(model, run, head=analysis == "diagnostics") == 0
