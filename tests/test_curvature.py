"""The Hessian operator against a dense autograd Hessian; parameter layouts and selection."""

import copy

import numpy as np
import pytest
import torch
from builders import dense_hessian, tiny_model

from ckpt_analysis.config import DataSpec
from ckpt_analysis.curvature import CurvatureKind, HessianOperator, ParamLayout
from ckpt_analysis.data import EvalData, load_eval_data
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.tasks import arithmetic

SMALL = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def sample():  # type: ignore[no-untyped-def]
    return load_eval_data(
        DataSpec(source="addition", num_examples=12, seed=3),
        arithmetic.build_tokenizer(),
        max_positions=32,
        vocab_size=len(arithmetic.VOCAB),
    )


@pytest.mark.parametrize("patterns", [["*"], ["*attention*"]])
def test_hvp_equals_dense_hessian_times_vector(sample, patterns: list[str]) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(seed=2, **SMALL).double().eval()
    layout = ParamLayout.from_model(model, patterns)
    op = HessianOperator(model, layout, sample, batch_size=5)
    dense = dense_hessian(copy.deepcopy(model), layout.names, sample)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(op(v).numpy(), (dense @ v).numpy(), rtol=1e-9, atol=1e-11)
    assert op.matvecs == 1 and op.n == dense.shape[0]


def test_loss_and_gradient_match_autograd(sample) -> None:  # type: ignore[no-untyped-def]
    from ckpt_analysis.losses import scored_token_losses

    model = tiny_model(seed=2, **SMALL).double().eval()
    op = HessianOperator(model, ParamLayout.from_model(model, ["*"]), sample, batch_size=4)
    losses = scored_token_losses(
        model, *(torch.from_numpy(a) for a in (sample.input_ids, sample.attention_mask, sample.score_mask))
    )
    assert op.loss() == pytest.approx(float(losses.mean().detach()), rel=1e-12)
    grads = torch.autograd.grad(losses.mean(), list(model.parameters()))
    np.testing.assert_allclose(
        op.gradient().numpy(), torch.cat([g.reshape(-1) for g in grads]).numpy(), rtol=1e-9, atol=1e-12
    )


def test_layout_from_config_equals_the_loaded_model_layout() -> None:
    model = tiny_model(**SMALL)
    from_model = ParamLayout.from_model(model, ["gpt_neox.layers.*"])
    from_config = ParamLayout.from_config(model.config.to_dict(), ["gpt_neox.layers.*"])
    assert from_model == from_config
    assert from_model.offsets[0] == 0 and from_model.offsets[-1] + from_model.sizes[-1] == from_model.size
    assert "lm_head.weight" in ParamLayout.from_model(model, ["*"]).names  # in-memory names


def test_patterns_matching_nothing_list_real_names() -> None:
    with pytest.raises(
        JobSpecError, match=r"match no parameter; names look like: gpt_neox\.embed_in\.weight"
    ):
        ParamLayout.from_model(tiny_model(**SMALL), ["transformer.h.*"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [10, 40])
def test_lanczos_residuals_without_products_equal_explicit_hvps(
    sample: EvalData, dtype: torch.dtype, steps: int
) -> None:
    """The stored residuals come from the Arnoldi relation, not from extra HVPs: they must equal
    ‖Hv − λv‖ by explicit products, to rounding (float64) or within float32's HVP floor."""
    from ckpt_analysis.spectral import lanczos

    model = tiny_model(seed=2, **SMALL)
    torch.nn.Module.to(model, dtype)  # transformers mis-types .to
    op = HessianOperator(model, ParamLayout.from_model(model, ["*"]), sample, batch_size=6)
    got = lanczos(op, op.n, 5, like=op.flat_params(), tol=1e-5, max_iter=steps)
    assert op.matvecs == got.iterations
    explicit = np.array(
        [float((op(v) - lam * v).norm()) for v, lam in zip(got.vectors, got.values, strict=True)]
    )
    scale = np.abs(got.values).max()
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(got.residuals, explicit, rtol=1e-6, atol=floor * scale)


@pytest.mark.parametrize("patterns", [["*"], ["*attention*"]])
def test_ggn_and_fisher_products_equal_their_dense_float64_constructions(
    sample: EvalData, patterns: list[str]
) -> None:
    from builders import dense_ggn_and_fisher

    from ckpt_analysis.curvature import FisherOperator, GGNOperator

    model = tiny_model(seed=2, **SMALL)
    torch.nn.Module.to(model, torch.float64)
    layout = ParamLayout.from_model(model.eval(), patterns)
    ggn, fisher = dense_ggn_and_fisher(copy.deepcopy(model), layout.names, sample)
    v = torch.randn(layout.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for operator, dense in ((GGNOperator, ggn), (FisherOperator, fisher)):
        op = operator(model, layout, sample, batch_size=5)
        np.testing.assert_allclose(op(v).numpy(), (dense @ v).numpy(), rtol=1e-9, atol=1e-12)
        assert torch.linalg.eigvalsh(dense).min() > -1e-10  # both are positive semi-definite
    hessian = dense_hessian(copy.deepcopy(model), layout.names, sample)
    assert torch.linalg.eigvalsh(hessian).min() < -1e-6  # ... while this Hessian is indefinite


def test_the_hessian_graph_cache_changes_no_number(sample: EvalData) -> None:
    model = tiny_model(seed=2, **SMALL)
    torch.nn.Module.to(model, torch.float64)
    layout = ParamLayout.from_model(model.eval(), ["*"])
    v = torch.randn(layout.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cached, fresh = (
        HessianOperator(model, layout, sample, batch_size=5, cache_graph=c) for c in (True, False)
    )
    for _ in range(2):
        assert torch.equal(cached(v), fresh(v))
    assert len(cached._graphs) == len(cached.batches) and not fresh._graphs


@pytest.fixture(scope="module")
def trained_pair() -> tuple[HessianOperator, HessianOperator]:
    """Float32 and float64 Hessians of the addition model trained as the demo trains it (about 100k
    parameters, 600 steps)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from ckpt_analysis.zoo.train import TrainConfig, train_arithmetic

    with tempfile.TemporaryDirectory() as folder:
        train_arithmetic(Path(folder), TrainConfig(steps=600, save_every=600, device="cpu"))
        model = AutoModelForCausalLM.from_pretrained(Path(folder) / "checkpoint-600")
    data = load_eval_data(
        DataSpec(source="addition", num_examples=32, seed=3),
        arithmetic.build_tokenizer(),
        max_positions=64,
        vocab_size=len(arithmetic.VOCAB),
    )
    ops = []
    for dtype in (torch.float32, torch.float64):
        copy_ = torch.nn.Module.to(copy.deepcopy(model), dtype)  # transformers mis-types .to
        ops.append(HessianOperator(copy_, ParamLayout.from_model(copy_, ["*"]), data, batch_size=32))
    return ops[0], ops[1]


def _float64_residuals(op64: HessianOperator, values: np.ndarray, vectors: torch.Tensor) -> np.ndarray:
    pairs = zip(values, vectors.double(), strict=True)
    return np.array([float((op64(y) - lam * y).norm()) for lam, y in pairs])


def test_every_float32_pair_is_accurate_to_its_own_eigenvalue_at_the_defaults(
    trained_pair: tuple[HessianOperator, HessianOperator],
) -> None:
    from ckpt_analysis.analyses.hessian import HessianParams
    from ckpt_analysis.spectral import lanczos

    op32, op64 = trained_pair
    p = HessianParams()
    like, rounding, tol, steps = op32.flat_params(), op32.rounding, p.tol, p.max_iter
    found = lanczos(op32, op32.n, p.k, like=like, which=p.which, tol=tol, max_iter=steps, rounding=rounding)
    true = _float64_residuals(op64, found.values, found.vectors)
    assert found.converged.all(), found.residuals / np.abs(found.values)
    assert np.all(true <= 1e-4 * np.abs(found.values)), true / np.abs(found.values)
    assert np.all(true <= 2 * found.residuals), true / found.residuals  # the flag is honest
    assert np.all(found.floors <= found.residuals)


def test_a_tolerance_below_the_measured_floor_stops_early_and_flags_nothing(
    trained_pair: tuple[HessianOperator, HessianOperator],
) -> None:
    from ckpt_analysis.spectral import lanczos

    op32, op64 = trained_pair
    found = lanczos(op32, op32.n, 3, like=op32.flat_params(), tol=1e-9, max_iter=150, rounding=op32.rounding)
    assert found.iterations < 60 and not found.converged.any()
    assert np.all(found.residuals >= found.floors) and np.all(found.floors > 1e-9 * np.abs(found.values))
    true = _float64_residuals(op64, found.values, found.vectors)
    assert np.all(true <= 2 * found.residuals)


def test_the_measured_rounding_bounds_each_pairs_product_error(
    trained_pair: tuple[HessianOperator, HessianOperator],
) -> None:
    from ckpt_analysis.spectral import lanczos

    op32, op64 = trained_pair
    found = lanczos(op32, op32.n, 4, like=op32.flat_params())
    rho = op32.rounding(found.vectors, found.values)
    errors = [float((op32(y).double() - op64(y.double())).norm()) for y in found.vectors]
    assert np.all(np.array(errors) <= rho * np.abs(found.values)), (errors, rho)
    assert rho < 1e-4  # ... and is no blanket bound: the float32 products are good to ~1e-5
    assert op64.rounding(found.vectors.double(), found.values) == 0.0


def test_a_pair_cut_short_is_never_flagged_converged(
    trained_pair: tuple[HessianOperator, HessianOperator],
) -> None:
    from ckpt_analysis.spectral import lanczos

    op32, _ = trained_pair
    cut = lanczos(op32, op32.n, 1, like=op32.flat_params(), max_iter=4)
    assert not cut.converged.any()
    assert cut.residuals[0] > 1e-4 * abs(cut.values[0]) > cut.floors[0]


def test_the_exported_operator_equals_the_dense_hessian_and_runs_under_eigsh(sample: EvalData) -> None:
    from scipy.sparse.linalg import eigsh

    import ckpt_analysis as ca

    model = tiny_model(seed=2, **SMALL).double().eval()
    hessian = ca.curvature_operator(model, sample, kind="hessian", params=["*attention*"], batch_size=5)
    dense = dense_hessian(copy.deepcopy(model), hessian.layout.names, sample).numpy()
    assert hessian.shape == dense.shape and hessian.dtype == np.float64
    block = np.random.default_rng(0).normal(size=(hessian.shape[0], 3))
    np.testing.assert_allclose(hessian @ block, dense @ block, rtol=1e-9, atol=1e-11)  # matmat
    np.testing.assert_allclose(hessian.T @ block[:, 0], dense @ block[:, 0], rtol=1e-9, atol=1e-11)
    top = np.sort(eigsh(hessian, k=3, which="LA", return_eigenvectors=False, tol=1e-12))
    np.testing.assert_allclose(top, np.linalg.eigvalsh(dense)[-3:], rtol=1e-8)


def test_the_exported_ggn_and_fisher_take_plain_token_ids(sample: EvalData) -> None:
    from builders import dense_ggn_and_fisher

    import ckpt_analysis as ca

    model = tiny_model(seed=2, **SMALL)
    torch.nn.Module.to(model, torch.float64)
    ids = EvalData(sample.input_ids, np.ones_like(sample.input_ids), np.ones(sample.input_ids.shape, bool))
    layout = ParamLayout.from_model(model.eval(), ["*"])
    ggn, fisher = dense_ggn_and_fisher(copy.deepcopy(model), layout.names, ids)
    v = np.random.default_rng(1).normal(size=layout.size)
    kinds: tuple[tuple[CurvatureKind, torch.Tensor], ...] = (("ggn", ggn), ("fisher", fisher))
    for kind, dense in kinds:
        op = ca.curvature_operator(model, torch.from_numpy(sample.input_ids), kind=kind, batch_size=4)
        np.testing.assert_allclose(op @ v, dense.numpy() @ v, rtol=1e-9, atol=1e-12)
    with pytest.raises(JobSpecError, match=r"kind = 'gauss' is not valid; choose one of: 'hessian'"):
        ca.curvature_operator(model, ids, kind="gauss")  # type: ignore[arg-type]


def test_the_operator_example_in_the_docs_runs() -> None:
    """docs/hessian.md, "The operators for your own solver", as a user would paste it."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "hessian.md").read_text()
    section = text.split("## The operators for your own solver", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    scope: dict[str, object] = {}
    exec(compile(code, "docs/hessian.md", "exec"), scope)
    assert scope["info"] == 0 and np.isfinite(scope["x"]).all()  # type: ignore[call-overload]


def test_the_sampled_fisher_equals_its_dense_construction_and_averages_to_the_ggn(sample: EvalData) -> None:
    """F̂ with the operator's own drawn targets against (1/SN) Σ J_xᵀ r rᵀ J_x built densely; with
    many targets per token F̂ approaches E F̂ = G (the GGN) as 1/√S."""
    from builders import dense_ggn_and_fisher, dense_logit_jacobian

    from ckpt_analysis.curvature import MCFisherOperator

    model = tiny_model(seed=2, **SMALL)
    torch.nn.Module.to(model, torch.float64)
    layout = ParamLayout.from_model(model.eval(), ["*attention*"])
    ggn, _ = dense_ggn_and_fisher(copy.deepcopy(model), layout.names, sample)
    z, jac = dense_logit_jacobian(copy.deepcopy(model), layout.names, sample)
    p = torch.softmax(z, dim=-1)
    v = torch.randn(layout.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for samples in (50, 3200):
        op = MCFisherOperator(
            model, layout, sample, batch_size=len(sample.input_ids), seed=1, samples=samples
        )
        product = op(v)
        y = op.targets[0]  # one batch: (token, sample)
        r = p[:, None, :] - torch.nn.functional.one_hot(y, p.shape[1]).to(p)  # (token, sample, vocab)
        rows = torch.einsum("nsv,nvp->nsp", r, jac).reshape(-1, layout.size)
        dense = rows.T @ rows / rows.shape[0]
        np.testing.assert_allclose(product.numpy(), (dense @ v).numpy(), rtol=1e-9, atol=1e-12)
        assert torch.linalg.eigvalsh(dense).min() > -1e-10  # PSD
        errors.append(float(torch.linalg.norm(dense - ggn) / torch.linalg.norm(ggn)))
    assert errors[1] < 0.05 and errors[1] < errors[0] / 4, errors  # 1/√S: 8× smaller at 64× S
    twins = [MCFisherOperator(model, layout, sample, batch_size=5, seed=1, samples=50) for _ in range(2)]
    for twin in twins:
        twin(v)
    assert all(torch.equal(twins[0].targets[k], twins[1].targets[k]) for k in twins[0].targets)  # seeded
