"""Probes: planted decodable labels, chance on the control task, the split, and the stored values
against an independent probe on ``output_hidden_states``."""

from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_grammar_run, build_local_run, job_dict

from ckpt_analysis.analyses.probes import control_labels, probe_accuracy, split_tokens
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.errors import DataError, JobSpecError
from ckpt_analysis.plan import make_plan
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features with the label (4 classes) written along 4 random directions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    directions = rng.normal(size=(4, 24))
    return rng.normal(size=(n, 24)) + 3 * directions[labels], labels


def test_probes_decode_planted_labels_and_stay_at_chance_on_the_control_task() -> None:
    x, y = _planted(2000, seed=0)
    types = np.arange(len(y))  # every token its own type: the control labels carry no signal
    fake = control_labels(types, y, seed=1)
    train, test = slice(0, 1500), slice(1500, None)
    accuracy = probe_accuracy((x[train], y[train]), (x[test], y[test]), c=1.0, max_iter=500)
    control = probe_accuracy((x[train], fake[train]), (x[test], fake[test]), c=1.0, max_iter=500)
    chance = np.bincount(fake[test]).max() / 500
    assert accuracy > 0.97
    assert control == pytest.approx(chance, abs=0.08)


def test_control_labels_are_one_per_type_drawn_from_the_label_distribution() -> None:
    rng = np.random.default_rng(0)
    types = rng.integers(0, 500, 20_000)
    labels = rng.choice(3, size=20_000, p=[0.6, 0.3, 0.1])
    fake = control_labels(types, labels, seed=2)
    for kind in np.unique(types)[:50]:
        assert len(np.unique(fake[types == kind])) == 1
    shares = np.bincount([fake[types == k][0] for k in np.unique(types)], minlength=3) / len(np.unique(types))
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.07)
    assert (control_labels(types, labels, seed=2) == fake).all()


def test_the_split_keeps_whole_sequences_on_one_side_and_bounds_the_sample() -> None:
    sequences = np.repeat(np.arange(40), 10)
    labelled = np.ones(400, dtype=bool)
    labelled[::7] = False
    train, test = split_tokens(sequences, labelled, sample=200, test_fraction=0.25, seed=0)
    assert len(train) + len(test) == 200 and labelled[np.concatenate([train, test])].all()
    assert not set(sequences[train]) & set(sequences[test])
    again = split_tokens(sequences, labelled, sample=200, test_fraction=0.25, seed=0)
    assert (again[0] == train).all() and (again[1] == test).all()


def _independent_cell(job, ds, checkpoint: int, layer: int, label: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """One cell of the store recomputed from ``output_hidden_states`` (resid_post of layer i is
    hidden_states[i + 1] before the last layer) with the store's split."""
    data = make_plan(job).eval_data
    source = CheckpointSource.from_spec(job.checkpoints)
    model = source.load(source.checkpoints()[checkpoint])
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(data.input_ids), output_hidden_states=True).hidden_states
    seq, pos = data.token_index
    x = hidden[layer + 1][seq, pos].numpy()
    y = ds[f"label_{label}"].values
    train, test = split_tokens(seq, y >= 0, sample=300, test_fraction=0.25, seed=0)
    fake = control_labels(
        data.input_ids[seq, pos][np.concatenate([train, test])], y[np.concatenate([train, test])], 0
    )
    real = probe_accuracy((x[train], y[train]), (x[test], y[test]), c=1.0, max_iter=500)
    control = probe_accuracy(
        (x[train], fake[: len(train)]), (x[test], fake[len(train) :]), c=1.0, max_iter=500
    )
    return real, control


def test_stored_probes_equal_an_independent_probe_and_selectivity_is_the_difference(tmp_path: Path) -> None:
    run = build_grammar_run(tmp_path / "run")
    raw = job_dict(run, tmp_path / "p.zarr", data={"source": "grammar", "num_examples": 24, "seq_len": 16})
    raw["analyses"] = {"probes": {"sample_tokens": 300, "sites": ["resid_pre", "resid_post"]}}
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job))
    ds = open_results(job.output)
    assert ds.probe_label.values.tolist() == ["pos", "role"]
    assert ds.probe_accuracy.dims == ("step", "probe_site", "layer", "probe_label")
    np.testing.assert_allclose(ds.probe_selectivity, ds.probe_accuracy - ds.probe_control_accuracy)
    assert ds.probe_tokens.sum() == 2 * 300
    real, control = _independent_cell(job, ds, checkpoint=2, layer=0, label="role")
    cell = ds.isel(step=2).sel(probe_site="resid_post", layer=0, probe_label="role")
    assert float(cell.probe_accuracy) == pytest.approx(real, abs=1e-9)
    assert float(cell.probe_control_accuracy) == pytest.approx(control, abs=1e-9)


def test_probes_name_the_valid_labels_when_asked_for_another(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0])
    raw = job_dict(run, tmp_path / "p.zarr")
    raw["analyses"] = {"probes": {"labels": ["role"]}}
    with pytest.raises(JobSpecError, match=r"\['role'\] not among the data's label columns: place, carry"):
        make_plan(job_from_dict(raw, base=tmp_path))
    raw["data"] = {"source": "topics", "num_examples": 4, "seq_len": 8}
    raw["analyses"] = {"probes": {}}
    with pytest.raises(JobSpecError, match=r"data\.source = 'topics' has none"):
        make_plan(job_from_dict(raw, base=tmp_path))


def test_too_little_data_for_a_split_is_one_error_and_no_store(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0])
    raw = job_dict(run, tmp_path / "p.zarr", data={"num_examples": 1})
    raw["analyses"] = {"probes": {}}
    with pytest.raises(DataError, match="fewer than two values on the train side of the probes"):
        run_job(job_from_dict(raw, base=tmp_path))
    assert not (tmp_path / "p.zarr").exists()
