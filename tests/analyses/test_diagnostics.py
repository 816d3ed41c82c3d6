"""Output diagnostics against a direct per-token computation from the logits, and label means."""

from pathlib import Path

import numpy as np
import pytest
import torch
from builders import (
    BATCH,
    build_grammar_run,
    build_local_run,
    job_dict,
    ops_per_batch,
    tiny_model,
    unit_context,
)
from transformers import AutoTokenizer

from ckpt_analysis.analyses.diagnostics import Diagnostics, DiagnosticsParams
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.plan import make_plan
from ckpt_analysis.registry import Unit
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.tasks import grammar


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


def test_category_match_is_the_share_of_argmax_tokens_with_the_targets_part_of_speech(tmp_path: Path) -> None:
    run = build_grammar_run(tmp_path / "run")
    raw = job_dict(run, tmp_path / "d.zarr", data={"source": "grammar", "num_examples": 24, "seq_len": 16})
    raw["analyses"] = {"diagnostics": {"category_match": ["pos"]}}
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job))
    ds = open_results(job.output)
    data = make_plan(job).eval_data
    source = CheckpointSource.from_spec(job.checkpoints)
    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoint-6")
    words, parts, _ = grammar.corpus(grammar.Grammar.from_tokenizer(tokenizer), 2000, 16, seed=99)
    seen = {
        w: int(p) for row, labels in zip(words, parts, strict=True) for w, p in zip(row, labels, strict=True)
    }
    for row, checkpoint in enumerate(source.checkpoints()):
        with torch.no_grad():
            logits = source.load(checkpoint)(input_ids=torch.from_numpy(data.input_ids)).logits.numpy()
        seq, pos = data.token_index
        guess = logits[seq, pos - 1].argmax(axis=-1)
        guessed_pos = np.array(
            [seen.get(str(tokenizer.convert_ids_to_tokens(int(g))), -1) for g in guess]
        )  # as sampled
        target_pos = ds.label_pos.values
        labelled = target_pos >= 0
        expected = (guessed_pos[labelled] == target_pos[labelled]).mean()
        assert float(ds.diag_match.isel(step=row).sel(match_label="pos")) == pytest.approx(
            expected, abs=1e-12
        )
        for level in range(len(grammar.POS)):  # TRACE's per-tag share: among the targets of each POS
            chosen = target_pos == level
            share = ds.diag_match_by_pos.isel(step=row).sel(pos_value=level)
            assert float(share) == pytest.approx((guessed_pos[chosen] == level).mean(), abs=1e-12)
    assert 0 < float(ds.diag_match.isel(step=-1).squeeze()) < 1


@pytest.mark.parametrize(
    ("source", "label", "message"),
    [
        ("grammar", "role", r"label 'role' is not a function of the token \(token \d+ has labels"),
        ("addition", "carry", r"label 'carry' is not a function of the token"),
        ("addition", "pos", r"names 'pos'; labels: 'place', 'carry'"),
    ],
)
def test_category_match_refuses_a_label_that_is_not_a_function_of_the_token(
    tmp_path: Path, source: str, label: str, message: str
) -> None:
    run = (
        build_grammar_run(tmp_path / "run") if source == "grammar" else build_local_run(tmp_path / "run", [0])
    )
    data = {"source": "grammar", "num_examples": 24, "seq_len": 16} if source == "grammar" else {}
    raw = job_dict(run, tmp_path / "d.zarr", data=data)
    raw["analyses"] = {"diagnostics": {"category_match": [label]}}
    with pytest.raises(JobSpecError, match=message):
        run_job(job_from_dict(raw, base=tmp_path))
    assert not (tmp_path / "d.zarr").exists()


def test_the_batch_loop_never_waits_for_the_device() -> None:
    model = tiny_model()
    unit = Unit("diagnostics", "step=0", checkpoint=0)
    analysis = Diagnostics(DiagnosticsParams())
    _, data_dependent = ops_per_batch(
        model, lambda data: analysis.compute(unit, unit_context(model, data, {}, batch_size=BATCH)), head=True
    )
    assert data_dependent == 0
