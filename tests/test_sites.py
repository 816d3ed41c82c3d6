"""Activation sites: hooks capture what the model computes, at the tokens asked for."""

import numpy as np
import torch
from builders import BATCH, ops_per_batch, tiny_model

from ckpt_analysis.data import EvalData
from ckpt_analysis.sites import SITES, activations_at


def test_activations_at_a_mask_equal_the_hidden_states_at_those_tokens_in_row_major_order() -> None:
    model = tiny_model(seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 16, size=(5, 9))
    attention = np.ones_like(ids, dtype=np.int8)
    attention[4, 6:] = 0
    mask = rng.random(ids.shape) < 0.3
    mask[2] = False  # a sequence with no masked token is never run
    acts = activations_at(model, ("resid_pre",), ids, attention, mask, batch_size=2, dtype=torch.float64)
    with torch.no_grad():
        hidden = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(attention),
            output_hidden_states=True,
        ).hidden_states
    for layer in range(model.config.num_hidden_layers):
        expected = hidden[layer][torch.from_numpy(mask)].to(torch.float64)
        assert acts[("resid_pre", layer)].shape == (mask.sum(), model.config.hidden_size)
        torch.testing.assert_close(acts[("resid_pre", layer)], expected, rtol=1e-5, atol=1e-6)


def test_activations_at_never_waits_for_the_device_inside_its_batch_loop() -> None:
    model = tiny_model()

    def gather(data: EvalData) -> None:
        activations_at(
            model,
            SITES,
            data.input_ids,
            data.attention_mask,
            data.score_mask,
            batch_size=BATCH,
            dtype=torch.float32,
        )

    per_batch, data_dependent = ops_per_batch(model, gather)
    assert data_dependent == 0
    assert per_batch <= 2 * len(SITES) * model.config.num_hidden_layers + 8
