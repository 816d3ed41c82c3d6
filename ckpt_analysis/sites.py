"""Activation sites of decoder models, captured with forward hooks (docs/covariance.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ckpt_analysis.device import to_device
from ckpt_analysis.types import Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SITES: tuple[Site, ...] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
"""Raw residual stream entering (``resid_pre``) and leaving (``resid_post``) each layer, and the
attention and MLP block outputs. ``resid_post`` is the layer's own output, *not* HF's last
``hidden_states`` entry, which comes after the final LayerNorm."""

_ATTN_NAMES = ("attention", "self_attn", "attn")
_MLP_NAMES = ("mlp", "fc2")  # OPT's layer holds fc1/fc2 itself: fc2's output is the MLP's
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
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
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
    tokens: dict[int, torch.Size] = {}  # (batch, position) of each layer's current input
    inside = {"resid_pre", "attn_out", "mlp_out"} & set(sites)  # what needs the layer's input
    for index, layer in enumerate(decoder_layers(model)):

        def pre(
            _m: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor], i: int = index
        ) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens[i] = hidden.shape[:2]
            if "resid_pre" in sites:
                callback("resid_pre", i, hidden)

        if inside:
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooked: list[tuple[Site, nn.Module]] = [("resid_post", layer)] if "resid_post" in sites else []
        if "attn_out" in sites:
            hooked.append(("attn_out", _child(layer, _ATTN_NAMES, "attention")))
        if "mlp_out" in sites:
            hooked.append(("mlp_out", _child(layer, _MLP_NAMES, "MLP")))
        for site, module in hooked:

            def post(_m: nn.Module, _a: object, out: torch.Tensor, s: Site = site, i: int = index) -> None:
                acts = _first(out)  # OPT's fc2 sees the tokens flattened: (batch × position, d)
                callback(s, i, acts.view(*tokens[i], -1) if acts.dim() == 2 else acts)

            handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def row_index(mask: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence, position)`` indices of a host ``mask``'s true cells, row-major, on ``device``.

    ``acts[row_index(mask, device)]`` picks the same rows as ``acts[mask]`` but, with the count
    known on the host, without the device-to-host synchronisation a boolean index costs per call.
    """
    seq, pos = np.nonzero(mask)
    return to_device(seq.astype(np.int64), device), to_device(pos.astype(np.int64), device)


def activations_at(
    model: PreTrainedModel,
    sites: tuple[Site, ...],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    mask: np.ndarray,
    *,
    batch_size: int,
    dtype: torch.dtype,
    on_device: bool = False,
) -> dict[tuple[Site, int], torch.Tensor]:
    """``(site, layer) → (token, d)`` activations, in ``dtype``, at the true cells of the
    ``(sequence, position)`` ``mask``, in row-major order. Forwards run over only the sequences that
    hold a masked token, ``batch_size`` at a time; only the masked rows are kept, on the model's
    device until the last batch, then moved to the CPU (one transfer per site and layer, none inside
    the batch loop) unless ``on_device``."""
    device = next(model.parameters()).device
    sequences = np.flatnonzero(mask.any(axis=1))
    picked: tuple[torch.Tensor, torch.Tensor] | None = None
    parts: dict[tuple[Site, int], list[torch.Tensor]] = {}

    def collect(site: Site, layer: int, acts: torch.Tensor) -> None:
        assert picked is not None
        parts.setdefault((site, layer), []).append(acts[picked].to(dtype))

    with torch.inference_mode(), capture(model, sites, collect):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            picked = row_index(mask[chunk], device)
            ids, attn = to_device(input_ids[chunk], device), to_device(attention_mask[chunk], device)
            model.base_model(input_ids=ids, attention_mask=attn)
    gathered = {key: torch.cat(chunks) for key, chunks in parts.items()}
    return gathered if on_device else {key: acts.cpu() for key, acts in gathered.items()}
