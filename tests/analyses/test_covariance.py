"""Feature covariance: the streaming accumulator and stored results against numpy.cov."""

from pathlib import Path

import numpy as np
import pytest
import torch
from builders import BATCH, independent_activations, job_dict, ops_per_batch, tiny_model, unit_context

from ckpt_analysis.analyses.covariance import (
    Covariance,
    CovarianceAccumulator,
    CovarianceParams,
    participation_ratio,
)
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.registry import Unit
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results


def test_streaming_accumulator_equals_numpy_cov_across_uneven_batches() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 16)) @ rng.normal(size=(16, 16))
    acc = CovarianceAccumulator(16)
    for part in np.array_split(x, [1, 7, 300, 301, 999]):
        acc.update(torch.from_numpy(part).float())
    xf = x.astype(np.float32).astype(np.float64)
    mean, cov = acc.statistics()
    np.testing.assert_allclose(cov.numpy(), np.cov(xf, rowvar=False, bias=False), rtol=1e-10)
    np.testing.assert_allclose(mean.numpy(), xf.mean(axis=0), rtol=1e-12)
    assert acc.count == 1000


def test_participation_ratio_is_one_for_rank_one_and_d_for_isotropic() -> None:
    v = np.arange(1.0, 5.0)
    assert participation_ratio(np.outer(v, v)) == pytest.approx(1.0)
    assert participation_ratio(np.eye(7) * 3) == pytest.approx(7.0)


@pytest.mark.parametrize("positions", ["scored", "predicting", "all"])
def test_stored_covariance_equals_numpy_cov_of_captured_activations(
    run_dir: Path, tmp_path: Path, positions: str
) -> None:
    raw = job_dict(
        run_dir,
        tmp_path / "r.zarr",
        analyses={"covariance": {"positions": positions}},
        checkpoints={"select": [0, 50], "dtype": "float64"},
        compute={"batch_size": 7},
    )
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.status == "done" for o in run_job(job))
    ds = open_results(job.output)
    ids, score = ds.input_ids.values, ds.score_mask.values.astype(bool)
    rows = {
        "scored": score,
        "all": np.ones_like(score),
        "predicting": np.concatenate([score[:, 1:], np.zeros_like(score[:, :1])], axis=1),
    }[positions]
    source = CheckpointSource.from_spec(job.checkpoints)
    for step_index, ckpt in enumerate(source.checkpoints()):
        acts = independent_activations(source.load(ckpt, attn="eager"), ids)
        for site in ds.site.values:
            for layer in ds.layer.values:
                x = acts[str(site)][layer][rows]
                got = ds.act_cov.isel(step=step_index).sel(site=site, layer=layer).values
                ref = np.cov(x, rowvar=False, bias=False)
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
                np.testing.assert_allclose(
                    ds.act_mean.isel(step=step_index).sel(site=site, layer=layer),
                    x.mean(axis=0),
                    rtol=1e-6,
                    atol=1e-6 * np.abs(x).max(),
                )
                assert int(ds.act_count.isel(step=step_index).sel(site=site, layer=layer)) == len(x)


def test_float32_gram_option_stays_within_1e6_relative() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 1.0, size=(4096, 64)) @ rng.normal(size=(64, 64))
    acc = CovarianceAccumulator(64, gram_dtype=torch.float32)
    for part in np.array_split(x, 4):
        acc.update(torch.from_numpy(part).float())
    ref = np.cov(x.astype(np.float32).astype(np.float64), rowvar=False)
    np.testing.assert_allclose(acc.statistics()[1].numpy(), ref, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("gram", ["float64", "float32"])
@pytest.mark.parametrize("layers", [2, 6])
@pytest.mark.parametrize(
    "sites", [["resid_post"], ["resid_pre", "resid_post"], ["resid_pre", "attn_out", "mlp_out", "resid_post"]]
)
def test_a_batch_costs_at_most_four_ops_per_site_layer_and_no_data_dependent_op(
    sites: list[str], layers: int, gram: str
) -> None:
    model = tiny_model(num_layers=layers)
    analysis = Covariance(CovarianceParams(sites=sites, gram_dtype=gram))  # type: ignore[arg-type]
    unit = Unit("covariance", "step=0", checkpoint=0)
    per_batch, data_dependent = ops_per_batch(
        model, lambda data: analysis.compute(unit, unit_context(model, data, {}, batch_size=BATCH))
    )
    assert per_batch <= 4 * len(sites) * layers + 8  # + the batch's own index and workspace
    assert data_dependent == 0
