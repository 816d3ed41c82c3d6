"""The one-hot attention model: leading terms after a few GD steps (docs/leading_terms.md), save, load."""

from __future__ import annotations

from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ckpt_analysis.analyses.leading_terms import cosine
from ckpt_analysis.corpus import CorpusStats, corpus_statistics, top_vocabulary, vocab_index
from ckpt_analysis.models.onehot import register
from ckpt_analysis.tasks.topics import corpus
from ckpt_analysis.zoo.onehot import GDConfig, train_onehot

K = 10


Toy = tuple[np.ndarray, torch.Tensor, CorpusStats]


@pytest.fixture(scope="module")
def toy() -> Toy:
    ids = corpus(48, 12, K, seed=0)
    mask = np.ones_like(ids)
    vocab, _ = top_vocabulary(ids, mask, K)
    return ids, torch.from_numpy(vocab), corpus_statistics(vocab_index(ids, vocab), mask, K)


def relative_errors(
    ids: np.ndarray, vocab: torch.Tensor, stats: CorpusStats, lr: float, s: int
) -> dict[str, float]:
    """‖weight − leading term‖ / ‖leading term‖ after s steps, in the second of two layers."""
    model = train_onehot(ids, K, None, GDConfig(lr=lr, steps=s, num_layers=2))
    layer = model.layer(1)

    def sub(m: torch.Tensor) -> torch.Tensor:
        return m.detach()[vocab][:, vocab]

    qk_coefficient = (3 * comb(s, 4) + 2 * comb(s, 3)) * lr**4  # docs/leading_terms.md leading terms
    pairs = {
        "output": (sub(model.output), s * lr * stats.bigram),
        "value": (sub(layer.value), comb(s, 2) * lr**2 * stats.value),
        "qk": (sub(layer.qk), qk_coefficient * stats.qk),
        "position": (layer.position.detach()[: stats.delta.numel()], qk_coefficient * stats.delta),
    }
    return {k: float((w - p).norm() / p.norm()) for k, (w, p) in pairs.items() if p.norm() > 0}


@pytest.mark.parametrize("s", [2, 3, 4])
def test_weights_after_s_steps_match_their_leading_terms_with_error_of_order_eta(toy: Toy, s: int) -> None:
    ids, vocab, stats = toy
    coarse = relative_errors(ids, vocab, stats, 0.1, s)
    fine = relative_errors(ids, vocab, stats, 0.05, s)
    assert set(coarse) == ({"output", "value"} if s == 2 else {"output", "value", "qk", "position"})
    for name, error in coarse.items():
        assert error < 0.05, name
        assert fine[name] == pytest.approx(error / 2, rel=0.1), name  # error shrinks linearly in η


def test_learned_weights_point_along_the_predictions_and_not_their_transposes(toy: Toy) -> None:
    ids, vocab, stats = toy
    model = train_onehot(ids, K, None, GDConfig(lr=0.1, steps=4))
    layer = model.layer(0)
    weights = {
        "output": (model.output, stats.bigram),
        "value": (layer.value, stats.value),
        "qk": (layer.qk, stats.qk),
    }
    for name, (weight, prediction) in weights.items():
        w = weight.detach()[vocab][:, vocab]
        assert cosine(w, prediction) >= 0.999, name
        assert cosine(w, prediction.T) < 0.95, name


def test_a_large_step_size_drifts_away_from_the_leading_terms(toy: Toy) -> None:
    ids, vocab, stats = toy
    model = train_onehot(ids, K, None, GDConfig(lr=2.0, steps=40))
    assert cosine(model.layer(0).value.detach()[vocab][:, vocab], stats.value) < 0.95


def test_saved_checkpoints_load_back_through_auto_model(tmp_path: Path, toy: Toy) -> None:
    ids, _, _ = toy
    trained = train_onehot(ids, K, tmp_path, GDConfig(lr=0.1, steps=3, save_every=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{s}" for s in range(4)]
    register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-3", dtype=torch.float64)
    batch = torch.from_numpy(ids[:4])
    torch.testing.assert_close(loaded(input_ids=batch).logits, trained(input_ids=batch).logits)
    zero = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-0")
    assert all(float(p.detach().abs().max()) == 0.0 for p in zero.parameters())
