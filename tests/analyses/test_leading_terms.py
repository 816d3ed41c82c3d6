"""Leading-term analyses end to end: stored statistics, token covariances and alignment scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import build_local_run, dense_corpus_statistics, independent_activations, job_dict

from ckpt_analysis.analyses.leading_terms import attention_rowcov
from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import JobSpec, job_from_dict
from ckpt_analysis.corpus import shuffle_tokens, vocab_index
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.plan import make_plan
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.tasks.topics import corpus
from ckpt_analysis.zoo.onehot import GDConfig, train_onehot

TOPICS: dict[str, Any] = {"source": "topics", "num_examples": 40, "seq_len": 12, "seed": 3}


def leading_terms_job(run_dir: Path, output: Path, analyses: dict[str, Any], **overrides: Any) -> JobSpec:
    raw = job_dict(run_dir, output, **{"data": TOPICS, **overrides})
    raw["analyses"] = analyses
    return job_from_dict(raw, base=output.parent)


NeoxStore = tuple[Path, JobSpec]


@pytest.fixture(scope="module")
def neox_store(tmp_path_factory: pytest.TempPathFactory) -> NeoxStore:
    root = tmp_path_factory.mktemp("lt")
    run_dir = build_local_run(root / "run", [0, 10])
    sites = ["resid_pre", "resid_mid", "resid_post"]
    analyses = {"corpus_stats": {"vocab_size": 8}, "token_cov": {"sites": sites}, "lt_alignment": {}}
    job = leading_terms_job(run_dir, root / "lt.zarr", analyses)
    assert all(o.ok for o in run_job(job))
    return root / "lt.zarr", job


def test_stored_corpus_statistics_equal_the_dense_formulas_for_real_and_shuffled_corpora(
    neox_store: NeoxStore,
) -> None:
    store, _ = neox_store
    ds = open_results(store)
    ids, mask = ds.input_ids.values, ds.attention_mask.values
    vocab = ds.vocab_id.values
    assert ds.vocab_count.values.tolist() == sorted(ds.vocab_count.values.tolist(), reverse=True)
    for corpus_name, corpus_ids in (("real", ids), ("shuffled", shuffle_tokens(ids, mask, 0))):
        dense = dense_corpus_statistics(vocab_index(corpus_ids, vocab), mask, 8)
        stored = ds.sel(corpus=corpus_name)
        for name in ("bigram", "context", "interchange", "value", "g", "qk"):
            got = stored[f"lt_{name}"].values
            np.testing.assert_allclose(got, dense[name], rtol=1e-5, atol=1e-6 * np.abs(dense[name]).max())
        # Δ comes from G in the store dtype (float32 here): float32 round-off, not float64's
        scale = np.abs(dense["delta"]).max()
        np.testing.assert_allclose(stored.lt_delta.values, dense["delta"], rtol=1e-5, atol=1e-6 * scale)
        assert int(stored.lt_pairs) == 40 * 11


def _token_acts(
    job: JobSpec, step_index: int, vocab: np.ndarray
) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    source = CheckpointSource.from_spec(job.checkpoints)
    model = source.load(source.checkpoints()[step_index], attn="eager")
    acts = {k: v[:, :, 0] for k, v in independent_activations(model, vocab[:, None]).items()}
    acts["resid_mid"] = acts["resid_pre"] + acts["attn_out"]
    return model, acts


def test_token_activations_equal_independently_captured_ones_and_give_numpy_cov(
    neox_store: NeoxStore,
) -> None:
    store, job = neox_store
    ds = open_results(store)
    vocab = ds.vocab_id.values
    assert "token_cov" not in ds  # the factor form is the default
    for step_index in range(2):
        _, acts = _token_acts(job, step_index, vocab)
        for layer in range(2):
            for site in ("resid_pre", "resid_mid", "resid_post"):
                got = ds.token_act.isel(step=step_index).sel(layer=layer, token_site=site).values
                np.testing.assert_allclose(got, acts[site][layer], rtol=1e-5, atol=1e-6)
                expected = np.cov(acts[site][layer])
                cov = np.cov(got.astype(np.float64))
                np.testing.assert_allclose(cov, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_token_cov_in_cov_form_equals_numpy_cov(neox_store: NeoxStore, tmp_path: Path) -> None:
    _, job = neox_store
    analyses = {"corpus_stats": {"vocab_size": 8}, "token_cov": {"form": "cov"}}
    cov_job = leading_terms_job(Path(job.checkpoints.location), tmp_path / "c.zarr", analyses)
    assert all(o.ok for o in run_job(cov_job))
    ds = open_results(tmp_path / "c.zarr")
    assert ds.token_cov.dims == ("step", "layer", "token_site", "vocab", "vocab_b")
    assert ds.token_site.values.tolist() == ["resid_post"]
    _, acts = _token_acts(job, 1, ds.vocab_id.values)
    expected = np.cov(acts["resid_post"][1])
    got = ds.token_cov.isel(step=1).sel(layer=1, token_site="resid_post").values
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def _rowcov_rownorm(m: np.ndarray) -> np.ndarray:
    return np.cov(m / np.linalg.norm(m, axis=1, keepdims=True))


def _attention_scores(model: Any, layer: int, x: np.ndarray, *, fold: bool) -> np.ndarray:
    """Head-mean q·k of each pair of tokens, via the module's own fused projection (bias removed)."""
    block = model.gpt_neox.layers[layer]
    attn = block.attention
    h = torch.from_numpy(x).float()
    with torch.no_grad():
        if fold:
            ln = block.input_layernorm
            h = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=ln.eps) * ln.weight
        qkv = attn.query_key_value(h) - attn.query_key_value.bias
        q, k, _ = qkv.view(h.shape[0], attn.config.num_attention_heads, -1).chunk(3, dim=-1)
        scores = torch.einsum("ahd,bhd->ab", q, k) / q.shape[1]
    out: np.ndarray = scores.double().numpy()
    return out


@pytest.mark.parametrize("fold", [True, False])
def test_activation_scores_equal_an_independent_numpy_computation(
    tmp_path: Path, neox_store: NeoxStore, fold: bool
) -> None:
    store, job = neox_store
    if not fold:
        job = leading_terms_job(
            Path(job.checkpoints.location),
            tmp_path / "nofold.zarr",
            {"corpus_stats": {"vocab_size": 8}, "lt_alignment": {"fold_ln": False}},
        )
        assert all(o.ok for o in run_job(job))
        store = tmp_path / "nofold.zarr"
    ds = open_results(store)
    vocab = ds.vocab_id.values
    for step_index in range(2):
        model, acts = _token_acts(job, step_index, vocab)
        for corpus_name in ("real", "shuffled"):
            stats = ds.sel(corpus=corpus_name)
            value_target = _rowcov_rownorm(stats.lt_value.values.astype(np.float64))
            qk = stats.lt_qk.values.astype(np.float64)
            for layer in range(2):
                got = ds.lt_score.isel(step=step_index).sel(layer=layer, corpus=corpus_name)
                for site in ("resid_pre", "resid_mid", "resid_post"):
                    expected = _cos(np.cov(acts[site][layer]), value_target)
                    assert float(got.sel(comparison=f"value_{site}")) == pytest.approx(expected, rel=1e-4)
                a_tok = np.cov(_attention_scores(model, layer, acts["resid_pre"][layer], fold=fold))
                assert float(got.sel(comparison="qk")) == pytest.approx(
                    _cos(a_tok, _rowcov_rownorm(qk)), rel=1e-4
                )
                assert float(got.sel(comparison="qk_T")) == pytest.approx(
                    _cos(a_tok, _rowcov_rownorm(qk.T)), rel=1e-4
                )


def test_weights_mode_tracks_the_leading_terms_of_a_trained_one_hot_model(tmp_path: Path) -> None:
    ids = corpus(TOPICS["num_examples"], TOPICS["seq_len"], 10, TOPICS["seed"])
    train_onehot(ids, 10, tmp_path / "run", GDConfig(lr=0.1, steps=4, save_every=1, dtype="float32"))
    analyses = {"corpus_stats": {"vocab_size": 10}, "lt_alignment": {}}
    job = leading_terms_job(tmp_path / "run", tmp_path / "w.zarr", analyses)
    assert all(o.ok for o in run_job(job))
    score = open_results(tmp_path / "w.zarr").lt_score.sel(layer=0, corpus="real")
    assert np.isnan(score.sel(step=0)).all()  # zero weights have no direction
    assert (score.sel(comparison="WO_bigram", step=[1, 2, 3, 4]) >= 0.999).all()
    assert (score.sel(comparison="V_value", step=[2, 3, 4]) >= 0.999).all()
    for comparison in ("W_qk", "P_delta"):
        assert (score.sel(comparison=comparison, step=[3, 4]) >= 0.999).all()
    assert (score.sel(comparison="W_qk_T", step=[3, 4]) < 0.95).all()


def test_activation_alignment_needs_step_0_as_its_null_baseline(tmp_path: Path) -> None:
    run_dir = build_local_run(tmp_path / "run", [5, 10])
    job = leading_terms_job(
        run_dir, tmp_path / "x.zarr", {"corpus_stats": {"vocab_size": 8}, "lt_alignment": {}}
    )
    with pytest.raises(JobSpecError, match="include step 0"):
        make_plan(job)
    assert not (tmp_path / "x.zarr").exists()


def test_weights_mode_on_a_gpt_neox_is_one_clear_error(tmp_path: Path) -> None:
    run_dir = build_local_run(tmp_path / "run", [0])
    analyses = {"corpus_stats": {"vocab_size": 8}, "lt_alignment": {"mode": "weights"}}
    with pytest.raises(JobSpecError, match="needs the 'onehot_attention' model"):
        make_plan(leading_terms_job(run_dir, tmp_path / "x.zarr", analyses))


def test_token_cov_names_the_supported_models(tmp_path: Path) -> None:
    train_onehot(corpus(8, 12, 6, 3), 6, tmp_path / "run", GDConfig(steps=1))
    analyses = {"corpus_stats": {"vocab_size": 6}, "token_cov": {}}
    job = leading_terms_job(
        tmp_path / "run", tmp_path / "x.zarr", analyses, data={**TOPICS, "num_examples": 8}
    )
    with pytest.raises(JobSpecError, match="not supported \\(supported: 'gpt_neox'\\)"):
        make_plan(job)


def test_attention_rowcov_equals_the_dense_k_by_k_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    pre, m = torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randn(6, 6, generator=gen)
    dense = np.cov((pre @ m.double() @ pre.T).numpy())
    np.testing.assert_allclose(attention_rowcov(pre, m).numpy(), dense, rtol=1e-10, atol=1e-10)


def test_bos_on_a_model_without_a_bos_token_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    run_dir = build_local_run(tmp_path / "run", [0])
    config = run_dir / "checkpoint-0" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "bos_token_id": None}))
    analyses = {"corpus_stats": {"vocab_size": 8}, "token_cov": {"bos": True}}
    job = leading_terms_job(run_dir, tmp_path / "x.zarr", analyses)
    with pytest.raises(
        JobSpecError, match=r"analyses\.token_cov\.bos = true but the model config has no bos_token_id"
    ):
        make_plan(job)
    assert not (tmp_path / "x.zarr").exists()
