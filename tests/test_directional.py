"""Forward-mode per-token derivatives against per-token reverse-mode autograd (docs/benchmarks.md)."""

import numpy as np
import pytest
import torch
from builders import per_token_reverse, tiny_model

from ckpt_analysis.config import DataSpec
from ckpt_analysis.curvature import ParamLayout
from ckpt_analysis.data import load_eval_data
from ckpt_analysis.directional import directional_derivatives
from ckpt_analysis.tasks import arithmetic

SMALL = {"hidden_size": 8, "num_layers": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    data = load_eval_data(
        DataSpec(source="addition", num_examples=6, seed=5),
        arithmetic.build_tokenizer(),
        max_positions=32,
        vocab_size=len(arithmetic.VOCAB),
    )
    model = tiny_model(seed=7, **SMALL).double().eval()
    layout = ParamLayout.from_model(model, ["*"])
    gen = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(layout.size, 3, generator=gen, dtype=torch.float64))[0].T
    return model, layout, data, directions


def test_first_and_second_directional_derivatives_match_reverse_mode(setup) -> None:  # type: ignore[no-untyped-def]
    model, layout, data, directions = setup
    got = directional_derivatives(
        model, layout, data, directions, batch_size=4, vectors_per_pass=2, second=True
    )
    losses, first, second = per_token_reverse(model, data, directions)
    np.testing.assert_allclose(got.losses.numpy(), losses.numpy(), rtol=1e-10)
    scale = first.abs().max().item()
    np.testing.assert_allclose(got.first.numpy(), first.numpy(), rtol=1e-5, atol=1e-10 * scale)
    assert got.second is not None
    np.testing.assert_allclose(
        got.second.numpy(), second.numpy(), rtol=1e-5, atol=1e-10 * second.abs().max().item()
    )


def test_the_fused_layer_norm_would_get_second_order_wrong(setup) -> None:  # type: ignore[no-untyped-def]
    """Guards the plain-ops LayerNorm: without it forward-over-forward drifts (docs/environment.md)."""
    from ckpt_analysis import directional

    model, layout, data, directions = setup
    _, _, reference = per_token_reverse(model, data, directions)
    plain = directional._plain_layer_norms
    directional._plain_layer_norms = lambda m: __import__("contextlib").nullcontext()  # type: ignore[assignment]
    try:
        fused = directional_derivatives(model, layout, data, directions, batch_size=4, second=True).second
    finally:
        directional._plain_layer_norms = plain
    assert fused is not None
    assert np.abs(fused.numpy() - reference.numpy()).max() > 1e-6 * reference.abs().max().item()


def test_params_override_evaluates_at_another_point(setup) -> None:  # type: ignore[no-untyped-def]
    model, layout, data, directions = setup
    named = dict(model.named_parameters())
    shifted = {n: named[n].detach() + 0.01 for n in layout.names}
    moved = tiny_model(seed=7, **SMALL).double().eval()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    a = directional_derivatives(model, layout, data, directions, batch_size=6, params=shifted)
    b = directional_derivatives(moved, layout, data, directions, batch_size=6)
    np.testing.assert_allclose(a.first.numpy(), b.first.numpy(), rtol=1e-10, atol=1e-14)
