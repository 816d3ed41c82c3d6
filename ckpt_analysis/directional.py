"""Per-token directional derivatives of the loss along parameter directions, forward mode (docs/polca.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from ckpt_analysis.attention import differentiable_attention
from ckpt_analysis.curvature import ParamLayout
from ckpt_analysis.data import EvalData
from ckpt_analysis.device import to_device
from ckpt_analysis.losses import scored_token_losses
from ckpt_analysis.sites import row_index

Params = dict[str, torch.Tensor]


def _plain_layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in plain ops: torch 2.13's fused kernel has a wrong second-order forward derivative."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + module.eps)
    return y * module.weight + module.bias if module.elementwise_affine else y


@contextmanager
def _plain_layer_norms(model: nn.Module) -> Iterator[None]:
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    for norm in norms:
        norm.forward = _plain_layer_norm.__get__(norm)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


@dataclass(frozen=True)
class Directional:
    """For K directions and N scored tokens: losses (N), first derivatives P (K, N), second c (K, N)."""

    losses: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor | None


def directional_derivatives(
    model: nn.Module,
    layout: ParamLayout,
    data: EvalData,
    directions: torch.Tensor,
    *,
    batch_size: int,
    vectors_per_pass: int = 4,
    second: bool = False,
    params: Params | None = None,
) -> Directional:
    """``P[b, x] = ⟨b, ∇θ ℓ(x)⟩`` and optionally ``c[b, x] = bᵀ∇²ℓ(x) b`` for all scored tokens.

    docs/polca.md: one JVP per direction covers every token at once (forward mode); ``c`` is
    forward-over-forward. ``vectors_per_pass`` directions share one ``vmap``-batched pass, so the
    primal computation is done once for them; activation memory grows linearly with it (about
    3 streams × vectors × ``batch_size`` sequences for first order, 4 with ``second``).
    ``params`` overrides any of the model's parameter values (e.g. the whole model at a midpoint
    θ_t + ½Δθ_t); the layout's parameters are differentiated there, the others held fixed there.
    """
    base = {n: p.detach() for n, p in model.named_parameters()}
    base.update(params or {})
    primal = {n: base[n] for n in layout.names}
    losses, first, curv = [], [], []
    with ExitStack() as stack:
        stack.enter_context(differentiable_attention(model))
        if second:
            stack.enter_context(_plain_layer_norms(model))
        for batch in _scored_batches(data, batch_size, directions.device):
            loss_of = _loss_function(model, base, batch)

            def along(direction: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return _derivatives(loss_of, primal, layout.unflatten(direction), second)  # noqa: B023

            rows = [vmap(along)(chunk) for chunk in directions.split(vectors_per_pass)]
            losses.append(rows[0][0][0])
            first.append(torch.cat([r[1] for r in rows]))
            if second:
                curv.append(torch.cat([r[2] for r in rows]))
    return Directional(torch.cat(losses), torch.cat(first, dim=1), torch.cat(curv, dim=1) if second else None)


ScoredBatch = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
"""A batch's input ids, attention mask and scored (sequence, position) indices, on the device."""


def _scored_batches(data: EvalData, size: int, device: torch.device) -> list[ScoredBatch]:
    """Every batch moved to the device once, its scored cells indexed from the host mask so no
    batch waits for the device to find them (:func:`~ckpt_analysis.sites.row_index`)."""
    return [
        (
            to_device(data.input_ids[part], device),
            to_device(data.attention_mask[part], device),
            row_index(data.score_mask[part], device),
        )
        for part in data.slices(size)
    ]


def _loss_function(model: nn.Module, base: Params, batch: ScoredBatch) -> Callable[[Params], torch.Tensor]:
    def loss_of(sub: Params) -> torch.Tensor:
        merged = {**base, **sub}

        def call(**kwargs: torch.Tensor) -> object:
            return functional_call(model, merged, args=(), kwargs=kwargs)

        return scored_token_losses(call, *batch)  # type: ignore[arg-type]

    return loss_of


def _derivatives(
    loss_of: Callable[[Params], torch.Tensor], primal: Params, tangent: Params, second: bool
) -> tuple[torch.Tensor, ...]:
    """(ℓ, dℓ/dε) and with ``second`` d²ℓ/dε², at ε = 0 along θ + ε·tangent, for every token."""
    if not second:
        out = jvp(loss_of, (primal,), (tangent,))
        return out[0], out[1]

    def value_and_slope(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        out = jvp(loss_of, (p,), (tangent,))
        return out[0], out[1]

    out = jvp(value_and_slope, (primal,), (tangent,))
    (value, slope), (_, curvature) = out[0], out[1]
    return value, slope, curvature
