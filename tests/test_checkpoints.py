"""Checkpoint sources: the Pythia schedule, selectors, Hub/local/state-dict loading, layout checks."""

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import build_fake_hub, build_local_run, save_checkpoint, tiny_model
from conftest import HUB_REPO, HUB_REVISIONS, RUN_STEPS

from ckpt_analysis.checkpoints import (
    PYTHIA_REVISIONS,
    Checkpoint,
    CheckpointSource,
    check_layout,
    prefetch,
    select,
)
from ckpt_analysis.config import HubCheckpoints, LocalCheckpoints, StateDictCheckpoints
from ckpt_analysis.errors import CheckpointError, JobSpecError


def test_pythia_schedule_has_154_revisions_in_order() -> None:
    assert len(PYTHIA_REVISIONS) == 154
    assert PYTHIA_REVISIONS[:11] == (
        "step0",
        "step1",
        "step2",
        "step4",
        "step8",
        "step16",
        "step32",
        "step64",
        "step128",
        "step256",
        "step512",
    )
    assert PYTHIA_REVISIONS[11] == "step1000" and PYTHIA_REVISIONS[-1] == "step143000"


def _ckpts(steps: list[int]) -> list[Checkpoint]:
    return [Checkpoint(s, f"step{s}", f"step{s}") for s in steps]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("all", [0, 1, 2, 4, 6, 1000, 2000, 3000]),
        ("log", [0, 1, 2, 4]),
        ("every=1000", [0, 1000, 2000, 3000]),
        ("2:1000", [2, 4, 6, 1000]),
        ("0:3000:1000", [0, 1000, 2000, 3000]),
        ([4, "step2000"], [4, 2000]),
    ],
)
def test_selectors_pick_the_documented_steps(selector: object, expected: list[int]) -> None:
    ckpts = _ckpts([0, 1, 2, 4, 6, 1000, 2000, 3000])
    assert [c.step for c in select(ckpts, selector)] == expected  # type: ignore[arg-type]


def test_selecting_an_absent_checkpoint_names_it() -> None:
    with pytest.raises(CheckpointError, match="checkpoint 'step3' is not among the available step0"):
        select(_ckpts([0, 1, 2]), ["step3"])


def test_bad_selector_lists_the_valid_forms() -> None:
    with pytest.raises(JobSpecError, match="'every=N', 'A:B'"):
        select(_ckpts([0]), "sometimes")


def test_hub_revisions_load_through_from_pretrained(hub_cache: Path) -> None:
    spec = HubCheckpoints(
        source="hub",
        repo=HUB_REPO,
        revisions=HUB_REVISIONS,
        cache_dir=str(hub_cache),
        dtype="float64",
        device="cpu",
    )
    source = CheckpointSource.from_spec(spec)
    ckpts = source.checkpoints()
    assert [c.step for c in ckpts] == [0, 1, 2, 4, 1000]
    model = source.load(ckpts[-1])
    assert next(model.parameters()).dtype == torch.float64
    assert not model.training
    assert check_layout(source, ckpts)["model_type"] == "gpt_neox"


def test_pythia_repos_fill_tokens_seen_whatever_revisions_are_listed(tmp_path: Path) -> None:
    build_fake_hub(tmp_path, "EleutherAI/pythia-70m", ["step0", "step1000"])
    spec = HubCheckpoints(
        source="hub", repo="EleutherAI/pythia-70m", revisions=["step0", "step1000"], cache_dir=str(tmp_path)
    )
    assert [c.tokens_seen for c in CheckpointSource.from_spec(spec).checkpoints()] == [0, 2_097_152_000]
    other = HubCheckpoints(source="hub", repo=HUB_REPO, revisions=["step0"], cache_dir=str(tmp_path))
    assert CheckpointSource.from_spec(other).checkpoints()[0].tokens_seen is None


def test_the_pythia_70m_standin_loads_its_float16_weights_in_the_jobs_dtype(tmp_path: Path) -> None:
    from safetensors import safe_open

    from ckpt_analysis.zoo.standin import pythia_standin

    cache = pythia_standin(tmp_path, ["step0", "step1000"])
    spec = HubCheckpoints(
        source="hub",
        repo="EleutherAI/pythia-70m",
        select=["step0", "step1000"],
        cache_dir=str(cache),
        dtype="float32",
        device="cpu",
    )
    source = CheckpointSource.from_spec(spec)
    ckpts = source.checkpoints()
    assert [c.tokens_seen for c in ckpts] == [0, 1000 * 2_097_152]
    (weights,) = source.weight_files(ckpts[1])
    with safe_open(str(weights), "pt") as stored:
        assert {stored.get_slice(k).get_dtype() for k in stored.keys()} == {"F16"}  # noqa: SIM118
    model = source.load(ckpts[1])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == 70_426_624  # Pythia-70M's count
    assert check_layout(source, ckpts)["use_parallel_residual"] is True


def test_missing_hub_revision_says_to_prefetch(hub_cache: Path) -> None:
    spec = HubCheckpoints(source="hub", repo=HUB_REPO, revisions=["step0", "step3"], cache_dir=str(hub_cache))
    source = CheckpointSource.from_spec(spec)
    with pytest.raises(
        CheckpointError, match=r"revision 'step3' of tiny-org/tiny-neox is not in the cache.*prefetch"
    ):
        check_layout(source, source.checkpoints())


def test_an_interrupted_hub_download_is_named_with_the_command_that_finishes_it(tmp_path: Path) -> None:
    cache = build_fake_hub(tmp_path, HUB_REPO, ["step0"])
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    weights = next(repo.glob("snapshots/*/model.safetensors"))
    blob = weights.resolve()
    blob.rename(blob.with_name(blob.name + ".incomplete"))  # as huggingface_hub leaves a cut download
    spec = HubCheckpoints(source="hub", repo=HUB_REPO, revisions=["step0"], cache_dir=str(cache))
    source = CheckpointSource.from_spec(spec)
    with pytest.raises(
        CheckpointError,
        match=r"step0: its download was interrupted \(1 incomplete file.*model\.safetensors.*prefetch JOB",
    ):
        source.weight_files(source.checkpoints()[0])


def test_prefetch_offline_reports_cached_and_missing(hub_cache: Path) -> None:
    spec = HubCheckpoints(
        source="hub", repo=HUB_REPO, revisions=["step0", "step3", "step4"], cache_dir=str(hub_cache)
    )
    assert prefetch(spec, offline=True) == (["step0", "step4"], ["step3"])


def test_local_run_discovers_checkpoint_and_step_folders(run_dir: Path, tmp_path: Path) -> None:
    spec = LocalCheckpoints(source="local", path=str(run_dir))
    assert [c.step for c in CheckpointSource.from_spec(spec).checkpoints()] == RUN_STEPS
    save_checkpoint(tiny_model(), tmp_path / "step_7")
    other = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    assert [c.revision for c in other.checkpoints()] == ["step_7"]


def test_state_dict_files_load_with_one_config(run_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_model(seed=3)
    save_file(model.state_dict(), str(tmp_path / "weights_100.safetensors"))
    torch.save(model.state_dict(), tmp_path / "weights_200.pt")
    spec = StateDictCheckpoints(
        source="state_dict",
        files=[str(tmp_path / "weights_*")],
        config=str(run_dir / "checkpoint-0" / "config.json"),
    )
    source = CheckpointSource.from_spec(spec)
    ckpts = source.checkpoints()
    assert [c.step for c in ckpts] == [100, 200]
    for ckpt in ckpts:
        loaded = source.load(ckpt)
        assert torch.equal(loaded.get_parameter("gpt_neox.embed_in.weight"), model.gpt_neox.embed_in.weight)


def test_architecture_mismatch_names_the_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "checkpoint-0")
    save_checkpoint(tiny_model(num_layers=3), tmp_path / "checkpoint-5")
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    with pytest.raises(CheckpointError, match="checkpoint checkpoint-5 has num_hidden_layers = 3"):
        check_layout(source, source.checkpoints())


def test_corrupt_weights_file_is_named(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "checkpoint-0")
    bad = save_checkpoint(tiny_model(), tmp_path / "checkpoint-5") / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    with pytest.raises(
        CheckpointError, match=r"checkpoint checkpoint-5: weights file model\.safetensors is corrupt"
    ):
        check_layout(source, source.checkpoints())


def test_nan_weights_are_rejected_at_load(tmp_path: Path) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.get_parameter("gpt_neox.layers.1.mlp.dense_h_to_4h.weight")[0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "checkpoint-3")
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    with pytest.raises(
        CheckpointError, match=r"checkpoint-3: parameter 'gpt_neox.layers.1.mlp.dense_h_to_4h.weight'"
    ):
        source.load(source.checkpoints()[0])


def test_cuda_request_without_cuda_is_a_clear_error(run_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    spec = dataclasses.replace(LocalCheckpoints(source="local", path=str(run_dir)), device="cuda")
    source = CheckpointSource.from_spec(spec)
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        source.load(source.checkpoints()[0])


def _hub_spec(cache: Path, revisions: list[str], **overrides: Any) -> HubCheckpoints:
    return HubCheckpoints(
        source="hub", repo=HUB_REPO, revisions=revisions, cache_dir=str(cache), device="cpu", **overrides
    )


def test_a_branch_name_takes_the_step_of_the_revision_at_its_commit(hub_cache: Path) -> None:
    source = CheckpointSource.from_spec(_hub_spec(hub_cache, ["step0", "step1", "main"]))
    assert [(c.revision, c.step) for c in source.checkpoints()] == [
        ("step0", 0),
        ("step1", 1),
        ("main", 1000),  # refs/main points at step1000's commit
    ]


def test_a_branch_beside_its_own_step_revision_is_refused_naming_both(hub_cache: Path) -> None:
    source = CheckpointSource.from_spec(_hub_spec(hub_cache, ["step0", "main", "step1000"]))
    with pytest.raises(CheckpointError, match=r"'main' and 'step1000' are both step 1000"):
        source.checkpoints()


def test_a_revision_with_no_step_is_refused_unless_mapped(tmp_path: Path) -> None:
    cache = build_fake_hub(tmp_path, HUB_REPO, ["step0", "final"])
    (cache / f"models--{HUB_REPO.replace('/', '--')}" / "refs" / "main").unlink()
    with pytest.raises(CheckpointError, match=r"revision 'final' names no training step.*checkpoints\.steps"):
        CheckpointSource.from_spec(_hub_spec(cache, ["step0", "final"])).checkpoints()
    mapped = CheckpointSource.from_spec(_hub_spec(cache, ["step0", "final"], steps={"final": 640}))
    assert [c.step for c in mapped.checkpoints()] == [0, 640]


def test_steps_table_renumbers_step_names(hub_cache: Path) -> None:
    """A run saving every 4 steps under step<index> names maps each revision explicitly."""
    spec = _hub_spec(hub_cache, ["step0", "step1", "step2"], steps={"step1": 4, "step2": 8})
    assert [c.step for c in CheckpointSource.from_spec(spec).checkpoints()] == [0, 4, 8]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_parallel_residual", False),
        ("hidden_act", "relu"),
        ("rotary_pct", 0.5),
        ("max_position_embeddings", 8),
    ],
)
def test_a_config_that_changes_the_function_is_blamed_against_the_majority(
    tmp_path: Path, field: str, value: object
) -> None:
    import json

    for step in (0, 5, 10):
        save_checkpoint(tiny_model(), tmp_path / f"checkpoint-{step}")
    config = tmp_path / "checkpoint-0" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    with pytest.raises(
        CheckpointError, match=rf"checkpoint checkpoint-0 has {field} = .*where checkpoint-5 and the majority"
    ):
        check_layout(source, source.checkpoints())


def test_bookkeeping_config_fields_are_ignored(tmp_path: Path) -> None:
    import json

    for step in (0, 5):
        save_checkpoint(tiny_model(), tmp_path / f"checkpoint-{step}")
    config = tmp_path / "checkpoint-5" / "config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "transformers_version": "0.0", "_name_or_path": "x"})
    )
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    assert check_layout(source, source.checkpoints())["model_type"] == "gpt_neox"


def _flip_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_corrupted_hub_blob_fails_at_load_naming_the_revision(tmp_path: Path) -> None:
    cache = build_fake_hub(tmp_path, HUB_REPO, ["step0", "step1"])
    source = CheckpointSource.from_spec(_hub_spec(cache, ["step0", "step1"]))
    step1 = source.checkpoints()[1]
    (blob,) = source.weight_files(step1)
    assert blob.is_symlink()
    _flip_middle(blob.resolve())
    source.load(source.checkpoints()[0])  # the intact revision still loads
    with pytest.raises(CheckpointError, match=r"checkpoint step1: model\.safetensors is corrupt: its sha256"):
        source.load(step1)
    unchecked = CheckpointSource.from_spec(_hub_spec(cache, ["step1"], verify_digests=False))
    unchecked.load(unchecked.checkpoints()[0])  # the opt-out loads the flipped bytes


def test_a_sha256_sidecar_verifies_local_weights(tmp_path: Path) -> None:
    import hashlib

    weights = save_checkpoint(tiny_model(), tmp_path / "checkpoint-0") / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (weights.parent / "model.safetensors.sha256").write_text(f"{digest}  model.safetensors\n")
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    source.load(source.checkpoints()[0])
    _flip_middle(weights)
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(tmp_path)))
    with pytest.raises(CheckpointError, match=r"checkpoint checkpoint-0: model\.safetensors is corrupt"):
        source.load(source.checkpoints()[0])


def test_legacy_torch_save_files_load(run_dir: Path, tmp_path: Path) -> None:
    model = tiny_model(seed=5)
    torch.save(model.state_dict(), tmp_path / "w_3.pt", _use_new_zipfile_serialization=False)
    spec = StateDictCheckpoints(
        source="state_dict", files=[str(tmp_path / "w_*.pt")], config=str(run_dir / "checkpoint-0")
    )
    source = CheckpointSource.from_spec(spec)
    check_layout(source, source.checkpoints())
    loaded = source.load(source.checkpoints()[0])
    assert torch.equal(loaded.get_parameter("gpt_neox.embed_in.weight"), model.gpt_neox.embed_in.weight)


def test_save_pretrained_weights_as_state_dicts_are_refused_at_plan_time(
    run_dir: Path, tmp_path: Path
) -> None:
    import shutil

    shutil.copy(run_dir / "checkpoint-0" / "model.safetensors", tmp_path / "w_0.safetensors")
    spec = StateDictCheckpoints(
        source="state_dict", files=[str(tmp_path / "w_*")], config=str(run_dir / "checkpoint-0")
    )
    source = CheckpointSource.from_spec(spec)
    with pytest.raises(
        CheckpointError, match=r"unexpected \['embed_out.weight'\].*checkpoints.source = 'local'"
    ):
        check_layout(source, source.checkpoints())


def test_a_revision_without_weights_is_missing_for_prefetch_and_the_cache_incomplete(tmp_path: Path) -> None:
    from ckpt_analysis.checkpoints import hub_cache_complete

    cache = build_fake_hub(tmp_path, HUB_REPO, ["step0", "step1"])
    spec = _hub_spec(cache, ["step0", "step1"])
    assert hub_cache_complete(spec)
    (weights,) = CheckpointSource.from_spec(spec).weight_files(
        CheckpointSource.from_spec(spec).checkpoints()[1]
    )
    weights.unlink()  # config.json stays
    assert prefetch(spec, offline=True) == (["step0"], ["step1"])
    assert not hub_cache_complete(spec)
    assert not hub_cache_complete(_hub_spec(cache, ["step0", "step2"]))


def test_an_unreadable_tokenizer_is_named_with_its_cause_and_the_ways_out(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0])
    (run / "checkpoint-0" / "tokenizer.json").write_text("{not json")
    source = CheckpointSource.from_spec(LocalCheckpoints(source="local", path=str(run)))
    with pytest.raises(
        CheckpointError, match=r"no tokenizer at .*checkpoint-0' \(.+\); set checkpoints\.tokenizer"
    ):
        source.tokenizer(source.checkpoints()[0])
