"""Activation sites of decoder models, captured with forward hooks (docs/covariance.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

Site = Literal["resid_pre", "attn_out", "mlp_out", "resid_post"]
SITES: tuple[Site, ...] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
"""Raw residual stream entering (``resid_pre``) and leaving (``resid_post``) each layer, and the
attention and MLP block outputs. ``resid_post`` is the layer's own output, *not* HF's last
``hidden_states`` entry, which comes after the final LayerNorm."""

_ATTN_NAMES = ("attention", "self_attn", "attn")
_MLP_NAMES = ("mlp",)
_LAYER_PATHS = ("gpt_neox.layers", "model.layers", "transformer.h", "model.decoder.layers")

Callback = Callable[[Site, int, torch.Tensor], None]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (GPT-NeoX, Llama-style, GPT-2-style, OPT-style)."""
    for path in _LAYER_PATHS:
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__}: no decoder layer list at any of {', '.join(_LAYER_PATHS)}")


def _child(layer: nn.Module, names: tuple[str, ...], site: str) -> nn.Module:
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise ValueError(f"{type(layer).__name__} exposes no {site} module (looked for {', '.join(names)})")


def _first(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(model: nn.Module, sites: tuple[Site, ...], callback: Callback) -> Iterator[None]:
    """Call ``callback(site, layer, activations)`` for each site during forwards in this block.

    Activations are ``(batch, position, d)`` tensors, handed over as the model computes them, so
    nothing is kept beyond the callback.
    """
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        if "resid_pre" in sites:

            def pre(
                _m: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor], i: int = index
            ) -> None:
                callback("resid_pre", i, args[0] if args else kwargs["hidden_states"])

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooked: list[tuple[Site, nn.Module]] = [("resid_post", layer)] if "resid_post" in sites else []
        if "attn_out" in sites:
            hooked.append(("attn_out", _child(layer, _ATTN_NAMES, "attention")))
        if "mlp_out" in sites:
            hooked.append(("mlp_out", _child(layer, _MLP_NAMES, "MLP")))
        for site, module in hooked:

            def post(_m: nn.Module, _a: object, out: torch.Tensor, s: Site = site, i: int = index) -> None:
                callback(s, i, _first(out))

            handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
