"""GPT-2, Llama (grouped-query attention) and OPT: sites, attention, per-token derivatives, a run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from builders import FAMILIES, dense_hessian, family_model, job_dict, per_token_reverse

from ckpt_analysis.attention import differentiable_attention
from ckpt_analysis.config import DataSpec, job_from_dict
from ckpt_analysis.curvature import ParamLayout
from ckpt_analysis.data import EvalData, load_eval_data
from ckpt_analysis.directional import directional_derivatives
from ckpt_analysis.run import run_job
from ckpt_analysis.sites import SITES, capture
from ckpt_analysis.store import open_results
from ckpt_analysis.tasks.arithmetic import build_tokenizer

ATTENTION_PARAMS = {"gpt2": "*.0.attn.c_attn.weight", "llama": "*.0.self_attn.*", "opt": "*.0.self_attn.*"}
"""Layer 0's attention weights (768–1088 parameters): small enough for a dense Hessian."""


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 16, size=(3, 10)))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_site_is_what_the_block_adds_to_the_residual_stream(family: str) -> None:
    model = family_model(family).double()
    seen: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad(), capture(model, SITES, lambda s, i, a: seen.__setitem__((s, i), a.clone())):
        hidden = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    for layer in range(model.config.num_hidden_layers):
        pre = seen[("resid_pre", layer)]
        torch.testing.assert_close(pre, hidden[layer])
        added = pre + seen[("attn_out", layer)] + seen[("mlp_out", layer)]
        torch.testing.assert_close(seen[("resid_post", layer)], added)


@pytest.mark.parametrize("family", FAMILIES)
def test_differentiable_attention_computes_the_models_own_eager_attention(family: str) -> None:
    model = family_model(family).double()
    model.config._attn_implementation = "eager"
    ids, mask = _ids(1), torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
        with differentiable_attention(model):
            plain = model(input_ids=ids, attention_mask=mask).logits
    # Eager Llama takes its softmax in float32 even in a float64 model: agreement to ~1e-8, where a
    # key/value head serving the wrong query heads would be off by O(1).
    torch.testing.assert_close(plain[mask.bool()], eager[mask.bool()], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_covariance_and_hessian_run_on_a_local_run_of_the_family(family: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (0, 10):
        model = family_model(family, seed=step)
        model.save_pretrained(run / f"checkpoint-{step}")
        build_tokenizer().save_pretrained(run / f"checkpoint-{step}")
    hessian = {
        "k": 2,
        "dtype": "float64",
        "tol": 1e-10,
        "max_iter": 200,
        "sample_sequences": 8,
        "params": [ATTENTION_PARAMS[family]],
    }
    raw = job_dict(run, tmp_path / "o.zarr", data={"num_examples": 16})
    raw["analyses"] = {"covariance": {}, "hessian": hessian}
    job = job_from_dict(raw, base=tmp_path)
    assert {o.status for o in run_job(job)} == {"done"}

    ds = open_results(job.output)
    assert ds.sizes["layer"] == 2 and ds.sizes["dim"] == 16  # read through GPT-2's n_layer / n_embd too
    sample = EvalData(ds.input_ids.values, ds.attention_mask.values, ds.score_mask.values.astype(bool)).head(
        8
    )
    names = tuple(ds.param_name.values.tolist())
    for i, step in enumerate((0, 10)):
        dense = dense_hessian(family_model(family, seed=step).double(), names, sample)
        top = torch.linalg.eigvalsh(dense).flip(0)[:2].numpy()
        np.testing.assert_allclose(ds.hessian_eigval.isel(step=i).values, top, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_token_directional_derivatives_match_reverse_mode(family: str) -> None:
    model = family_model(family, seed=2).double()
    data = load_eval_data(
        DataSpec(source="addition", num_examples=4, seed=5),
        build_tokenizer(),
        max_positions=32,
        vocab_size=16,
    )
    layout = ParamLayout.from_model(model, ["*"])
    gen = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(layout.size, 2, generator=gen, dtype=torch.float64))[0].T
    got = directional_derivatives(model, layout, data, directions, batch_size=4, second=True)
    losses, first, second = per_token_reverse(model, data, directions)
    np.testing.assert_allclose(got.losses.numpy(), losses.numpy(), rtol=1e-10)
    np.testing.assert_allclose(
        got.first.numpy(), first.numpy(), rtol=1e-5, atol=1e-10 * first.abs().max().item()
    )
    assert got.second is not None
    np.testing.assert_allclose(
        got.second.numpy(), second.numpy(), rtol=1e-5, atol=1e-10 * second.abs().max().item()
    )
