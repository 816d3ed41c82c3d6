"""Results store: named dims and coordinates, plain xarray/zarr access, spec guarding, NaN fill."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from builders import job_dict

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.digests import content_digests, spec_hash
from ckpt_analysis.errors import StoreError
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results, store_meta, unit_states


@pytest.fixture
def planned(run_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    job = job_from_dict(job_dict(run_dir, tmp_path / "r.zarr"), base=tmp_path)
    prepare_store(job, force=False)
    return job


def test_store_has_named_dims_coordinates_and_token_table(planned) -> None:  # type: ignore[no-untyped-def]
    ds = open_results(planned.output)
    assert ds.act_cov.dims == ("step", "site", "layer", "dim", "dim_b")
    assert ds.step.dtype == np.int64 and ds.step.values.tolist() == [0, 10, 20, 30, 40, 50]
    assert ds.revision.values.tolist()[:2] == ["checkpoint-0", "checkpoint-10"]
    assert ds.site.values.tolist() == ["resid_pre", "attn_out", "mlp_out", "resid_post"]
    assert set(ds.label_carry.values.tolist()) == {0, 1}
    assert ds.token_context.values[0].endswith("=")
    act_cov = zarr.open_array(planned.output, path="act_cov", mode="r")
    assert act_cov.metadata.zarr_format == 3
    assert act_cov.metadata.dimension_names == ("step", "site", "layer", "dim", "dim_b")
    assert act_cov.chunks[:3] == (1, 1, 1)
    meta = store_meta(planned.output)
    assert meta["spec_hash"] == spec_hash(planned, content_digests(planned)) and "torch" in meta["versions"]


def test_unwritten_units_read_as_nan_and_missing(planned) -> None:  # type: ignore[no-untyped-def]
    ds = open_results(planned.output)
    assert np.isnan(ds.act_cov.sel(step=10).values).all()
    assert (ds.act_count.values == -1).all()
    assert {s.state for s in unit_states(planned.output)} == {"missing"}


def test_plain_xarray_reads_the_store_without_the_package(planned) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys, xarray as xr; ds = xr.open_zarr(sys.argv[1]); "
        "assert 'ckpt_analysis' not in sys.modules; print(ds.act_cov.sel(step=20, layer=1).dims)"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, planned.output],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "('site', 'dim', 'dim_b')" in out.stdout


def test_rerun_with_another_spec_is_refused_unless_forced(planned, run_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = job_from_dict(job_dict(run_dir, tmp_path / "r.zarr", data={"num_examples": 8}), base=tmp_path)
    with pytest.raises(StoreError, match=r"holds results of a different job spec .* --force"):
        prepare_store(other, force=False)
    assert prepare_store(other, force=True) == "replace"
    assert open_results(other.output).sizes["sequence"] == 8


def test_output_that_is_a_file_or_foreign_folder_is_refused(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    for output, match in (
        ("file.zarr", "is a file"),
        ("folder", "non-empty folder that is not a results store"),
    ):
        job = job_from_dict(job_dict(run_dir, tmp_path / output), base=tmp_path)
        with pytest.raises(StoreError, match=match):
            run_job(job, force=True)


def test_query_selects_one_step_layer_matrix(planned) -> None:  # type: ignore[no-untyped-def]
    run_job(planned)
    cov = open_results(planned.output).act_cov.sel(step=30, layer=0, site="resid_post")
    assert cov.shape == (32, 32) and np.isfinite(cov.values).all()


def test_fast_read_returns_the_same_block_as_xarray(planned) -> None:  # type: ignore[no-untyped-def]
    from ckpt_analysis import read

    run_job(planned, executor="inprocess")
    ds = open_results(planned.output)
    got = read(planned.output, "act_cov", step=30, site="mlp_out", layer=1)
    np.testing.assert_array_equal(got, ds.act_cov.sel(step=30, site="mlp_out", layer=1).values)
    np.testing.assert_array_equal(
        read(planned.output, "act_count", step=10), ds.act_count.sel(step=10).values
    )
    assert read(planned.output, "token_text")[0] == ds.token_text.values[0]  # non-raw codec: via zarr


def test_fast_read_of_an_unwritten_block_is_nan_and_bad_labels_are_named(planned) -> None:  # type: ignore[no-untyped-def]
    from ckpt_analysis import read

    assert np.isnan(read(planned.output, "act_mean", step=0, site="attn_out", layer=0)).all()
    with pytest.raises(StoreError, match=r"step = 7 is not in the store"):
        read(planned.output, "act_cov", step=7, site="mlp_out", layer=1)
    with pytest.raises(StoreError, match=r"also select \['site', 'layer'\]"):
        read(planned.output, "act_cov", step=10)
    with pytest.raises(StoreError, match=r"no dimension\(s\) \['colour'\]"):
        read(planned.output, "act_cov", colour=1)


def test_a_checkpoint_folder_without_tokenizer_files_is_refused_at_plan_time(tmp_path: Path) -> None:
    from builders import tiny_model

    from ckpt_analysis.errors import DataError

    tiny_model().save_pretrained(tmp_path / "run" / "checkpoint-0")  # weights and config only
    job = job_from_dict(job_dict(tmp_path / "run", tmp_path / "t.zarr"), base=tmp_path)
    with pytest.raises(DataError, match=r"only special tokens .*set checkpoints\.tokenizer"):
        prepare_store(job, force=False)
    assert not (tmp_path / "t.zarr").exists()


def test_an_analysis_without_options_says_so(run_dir: Path, tmp_path: Path) -> None:
    from ckpt_analysis.errors import JobSpecError
    from ckpt_analysis.registry import build_analyses

    job = job_from_dict(
        job_dict(run_dir, tmp_path / "o.zarr", analyses={"token_loss": {"dtype": "float64"}}), base=tmp_path
    )
    with pytest.raises(JobSpecError, match=r"\[analyses\.token_loss\] takes no options; remove 'dtype'"):
        build_analyses(job)


def test_variables_are_declared_by_dimension_sizes_and_checked_once() -> None:
    from ckpt_analysis.registry import Variable

    var = Variable.of("x", {"step": 4, "site": 2, "dim": 8}, unit_axes=2, doc="d")
    assert (var.dims, var.shape, var.chunks, np.isnan(var.fill)) == (
        ("step", "site", "dim"),
        (4, 2, 8),
        (1, 1, 8),
        True,
    )
    assert Variable.of("n", {"step": 4}, "int64").fill == -1
    with pytest.raises(ValueError, match="do not fit"):
        Variable(name="y", dims=("a",), shape=(3,), dtype="float32", chunks=(5,), fill=0)
    with pytest.raises(ValueError, match="dims"):
        Variable(name="z", dims=("a", "b"), shape=(3,), dtype="float32", chunks=(1,), fill=0)


def test_an_analysis_takes_its_parameters_class_from_its_subscript() -> None:
    from ckpt_analysis.analyses.hessian import BasisParams, HessianBasis
    from ckpt_analysis.analyses.polca import Polca, PolcaParams

    assert Polca.params_type is PolcaParams and HessianBasis.params_type is BasisParams
    assert HessianBasis.from_spec({"k": 3}).params == BasisParams(k=3)


def test_a_label_column_named_label_is_stored_as_label(tmp_path: Path) -> None:
    import json

    from builders import build_local_run

    build_local_run(tmp_path / "run", [0])
    rows = [{"ids": [3, 4, 5, 6], "label": [0, 1, 0, 1], "pos_tag": 7}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = {"source": "dataset", "path": str(tmp_path / "d.jsonl"), "ids_column": "ids", "seq_len": 4}
    job = job_from_dict(
        job_dict(tmp_path / "run", tmp_path / "l.zarr", data={**data, "label_columns": ["label", "pos_tag"]}),
        base=tmp_path,
    )
    prepare_store(job, force=False)
    ds = open_results(job.output)
    assert ds.label.values.tolist() == [1, 0, 1] and ds.label_pos_tag.values.tolist() == [7, 7, 7]
