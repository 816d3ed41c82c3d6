"""Job spec parsing: strict keys, literal choices, path resolution, spec hashes."""

from pathlib import Path
from typing import Any

import pytest
from builders import job_dict, write_job

from ckpt_analysis.config import JobSpec, job_from_dict, load_job
from ckpt_analysis.digests import spec_hash
from ckpt_analysis.errors import JobSpecError


def test_unknown_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", colour="blue")
    with pytest.raises(JobSpecError, match=r"unknown key\(s\) 'colour' in \[job\]; valid keys: name, output"):
        job_from_dict(raw, base=tmp_path)


def test_unknown_nested_key_names_its_table(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", data={"sequence_length": 5})
    with pytest.raises(JobSpecError, match=r"'sequence_length' in \[data\]; valid keys: source, .*seq_len"):
        job_from_dict(raw, base=tmp_path)


def test_bad_literal_lists_choices(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", checkpoints={"dtype": "float8"})
    with pytest.raises(
        JobSpecError, match=r"checkpoints\.dtype = 'float8' is not valid; choose one of: 'float32'"
    ):
        job_from_dict(raw, base=tmp_path)


def test_wrong_type_is_reported(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", compute={"workers": "two"})
    with pytest.raises(JobSpecError, match=r"compute\.workers = 'two' must be int"):
        job_from_dict(raw, base=tmp_path)


@pytest.mark.parametrize("key", ["workers", "batch_size", "vectors_per_pass"])
def test_non_positive_compute_sizes_are_rejected(tmp_path: Path, key: str) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", compute={key: 0})
    with pytest.raises(JobSpecError, match=rf"compute\.{key} = 0 must be at least 1"):
        job_from_dict(raw, base=tmp_path)


def test_job_without_analyses_is_rejected(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr")
    raw["analyses"] = {}
    with pytest.raises(JobSpecError, match="names no analyses"):
        job_from_dict(raw, base=tmp_path)


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    path = write_job(tmp_path / "jobs" / "j.toml", Path("../run"), Path("out.zarr"))
    job = load_job(path)
    assert job.output == str(tmp_path / "jobs" / "out.zarr")
    assert job.checkpoints.location == str(tmp_path / "run")


def test_spec_hash_ignores_compute_but_not_analysis_settings(tmp_path: Path) -> None:
    base = job_from_dict(job_dict(tmp_path, tmp_path / "o.zarr"), base=tmp_path)
    faster = job_from_dict(job_dict(tmp_path, tmp_path / "o.zarr", compute={"workers": 8}), base=tmp_path)
    other = job_from_dict(
        job_dict(tmp_path, tmp_path / "o.zarr", analyses={"covariance": {"positions": "all"}}), base=tmp_path
    )
    assert spec_hash(base) == spec_hash(faster)
    assert spec_hash(base) != spec_hash(other)


def test_missing_job_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=r"nope\.toml' does not exist"):
        load_job(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        (None, "name", "sweep\ntouch /tmp/X\n"),
        ("slurm", "partition", "gpu\n#SBATCH --wrap=x"),
        ("slurm", "time", "01:00:00\r"),
        ("slurm", "sbatch_args", ["--qos=a\nrm -rf ~"]),
        ("slurm", "setup", ["module load x\u0000"]),
        ("data", "path", "corpus\t.jsonl"),
    ],
)
def test_control_characters_anywhere_are_refused_naming_the_key(
    tmp_path: Path, table: str | None, key: str, value: object
) -> None:
    overrides = {key: value} if table is None else {table: {key: value}}
    raw = job_dict(tmp_path, tmp_path / "o.zarr", **overrides)
    with pytest.raises(JobSpecError, match=rf"{key}.* holds a control character"):
        job_from_dict(raw, base=tmp_path)


@pytest.mark.parametrize("name", ["my sweep", "a$(id)", "`id`", "x;y", "a'b", 'a"b'])
def test_job_names_are_plain_words(tmp_path: Path, name: str) -> None:
    with pytest.raises(JobSpecError, match="may hold only letters, digits"):
        job_from_dict(job_dict(tmp_path, tmp_path / "o.zarr", name=name), base=tmp_path)


@pytest.mark.parametrize("key", ["partition", "account", "time", "mem", "gres"])
@pytest.mark.parametrize("value", ["a b", "$(id)", "`id`", "x;y", "'q'", '"q"', "a&&b"])
def test_sbatch_values_refuse_shell_syntax(tmp_path: Path, key: str, value: str) -> None:
    raw = job_dict(tmp_path, tmp_path / "o.zarr", slurm={key: value})
    with pytest.raises(JobSpecError, match=rf"slurm\.{key} = .* may hold only"):
        job_from_dict(raw, base=tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data": {"seq_len": 0}}, r"data\.seq_len = 0 must be at least 1"),
        ({"data": {"seq_len": -3}}, r"data\.seq_len = -3 must be at least 1"),
        ({"data": {"num_examples": 0}}, r"data\.num_examples = 0"),
        ({"checkpoints": {"select": "every=0"}}, r"selector 'every=0' is not valid"),
        ({"checkpoints": {"select": "0:40:0"}}, r"selector '0:40:0' is not valid"),
    ],
)
def test_bad_sizes_and_selectors_fail_at_parse_time(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(JobSpecError, match=message):
        job_from_dict(job_dict(tmp_path, tmp_path / "o.zarr", **overrides), base=tmp_path)


def test_spec_hash_ignores_where_files_sit_and_the_device(tmp_path: Path) -> None:
    here = job_from_dict(job_dict(tmp_path / "a", tmp_path / "a.zarr"), base=tmp_path)
    moved = job_from_dict(
        job_dict(tmp_path / "b", tmp_path / "b.zarr", checkpoints={"device": "cpu"}), base=tmp_path
    )
    content = {"checkpoints": [[0, "checkpoint-0", ["abc"]]], "data": None, "tokenizer": None}
    assert spec_hash(here, content) == spec_hash(moved, content)
    assert spec_hash(here, content) != spec_hash(here, {**content, "data": "other bytes"})


def test_spec_hash_of_a_hub_dataset_covers_its_subset_but_not_its_cache_dir(tmp_path: Path) -> None:
    def hub_job(**data: str) -> JobSpec:
        fields = {"source": "dataset", "path": "acme/sums", **data}
        return job_from_dict(job_dict(tmp_path, tmp_path / "o.zarr", data=fields), base=tmp_path)

    content = {"checkpoints": [[0, "checkpoint-0", ["abc"]]], "data": "acme/sums", "tokenizer": None}
    here, moved = hub_job(subset="easy", cache_dir="a"), hub_job(subset="easy", cache_dir="/elsewhere")
    assert moved.data.cache_dir == "/elsewhere" and here.data.cache_dir == str(tmp_path / "a")
    assert spec_hash(here, content) == spec_hash(moved, content)
    assert spec_hash(here, content) != spec_hash(hub_job(subset="hard", cache_dir="a"), content)


def test_relative_tokenizer_resolves_against_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "jobs" / "tok").mkdir(parents=True)
    path = write_job(
        tmp_path / "jobs" / "j.toml", Path("run"), Path("o.zarr"), checkpoints={"tokenizer": "tok"}
    )
    assert load_job(path).checkpoints.tokenizer == str(tmp_path / "jobs" / "tok")


@pytest.mark.parametrize(
    ("analysis", "sites", "message"),
    [
        ("covariance", [], r"analyses\.covariance\.sites is empty"),
        ("covariance", ["resid_pre", "resid_pre"], r"names resid_pre more than once"),
        ("token_cov", [], r"analyses\.token_cov\.sites is empty"),
    ],
)
def test_empty_or_repeated_sites_are_refused_before_a_store_exists(
    tmp_path: Path, analysis: str, sites: list[str], message: str
) -> None:
    from ckpt_analysis.registry import get_analysis

    with pytest.raises(JobSpecError, match=message):
        get_analysis(analysis).from_spec({"sites": sites})


def test_an_error_is_one_plain_line() -> None:
    from ckpt_analysis.errors import one_line

    exc = RuntimeError(
        "\x1b[31mCUDA out of memory.\x1b[0m Tried to allocate 2 GiB\n  at frame 1\n  at frame 2"
    )
    assert one_line(exc) == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"


def test_options_added_later_leave_the_spec_hash_of_older_jobs_unchanged(tmp_path: Path) -> None:
    """The hash of a job that leaves ``data.pad_id`` unset, as before the option existed."""
    job = job_from_dict(job_dict(tmp_path / "run", tmp_path / "o.zarr"), base=tmp_path)
    assert spec_hash(job, {"a": 1}) == "9a46dafab484c9c0"
    padded = job_from_dict(job_dict(tmp_path / "run", tmp_path / "o.zarr", data={"pad_id": 0}), base=tmp_path)
    assert spec_hash(padded, {"a": 1}) != spec_hash(job, {"a": 1})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"source": "local", "path": "run", "steps": {"main": 3}},
            r"checkpoints\.steps belongs to source = 'hub', not 'local'; source = 'local' takes: .*path",
        ),
        (
            {"source": "hub", "repo": "org/m", "path": "run"},
            r"checkpoints\.path belongs to source = 'local', not 'hub'; source = 'hub' takes: .*repo",
        ),
        (
            {"source": "local", "path": "run", "files": ["*.pt"]},
            r"checkpoints\.files belongs to source = 'state_dict'",
        ),
        ({"source": "hub", "revisions": ["step0"]}, r"missing required key\(s\) 'repo' in \[checkpoints\]"),
        ({"source": "state_dict", "files": ["*.pt"]}, r"missing required key\(s\) 'config'"),
        ({"source": "hub", "repo": "org/m", "steps": {"main": -1}}, r"checkpoints\.steps\.main = -1"),
        (
            {"source": "hub", "repo": "org/m", "revisions": "all"},
            r"checkpoints\.revisions = 'all' must be 'pythia' or a list",
        ),
        (
            {"source": "local", "path": "run", "pattern": "ckpt"},
            r"checkpoints\.pattern 'ckpt' must contain '\{step\}'",
        ),
        (
            {"source": "disk", "path": "run"},
            r"checkpoints\.source = 'disk' is not valid; choose one of: 'hub', 'local', 'state_dict'",
        ),
    ],
)
def test_each_checkpoint_source_takes_its_own_keys_at_parse_time(
    tmp_path: Path, table: dict[str, object], message: str
) -> None:
    raw = job_dict(tmp_path, tmp_path / "o.zarr")
    raw["checkpoints"] = table
    with pytest.raises(JobSpecError, match=message):
        job_from_dict(raw, base=tmp_path)


def test_a_spec_stored_with_every_sources_keys_still_parses_and_hashes_as_before(tmp_path: Path) -> None:
    from ckpt_analysis.config import LocalCheckpoints
    from ckpt_analysis.digests import spec_hash

    raw = job_dict(tmp_path, tmp_path / "o.zarr")
    job = job_from_dict(raw, base=tmp_path)
    legacy: dict[str, Any] = {
        "repo": None,
        "revisions": "pythia",
        "cache_dir": None,
        "files": [],
        "config": None,
        "steps": {},
    }
    stored = {**job.to_dict(), "checkpoints": {**job.to_dict()["checkpoints"], **legacy}}
    again = job_from_dict(stored, base=tmp_path)
    assert isinstance(again.checkpoints, LocalCheckpoints) and again == job
    assert spec_hash(again, {}) == spec_hash(job, {})
