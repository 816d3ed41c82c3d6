"""The Hessian operator: HVPs of the mean scored-token loss over a fixed sample (docs/hessian.md)."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ckpt_analysis.attention import differentiable_attention
from ckpt_analysis.data import EvalData
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.losses import scored_token_losses

if TYPE_CHECKING:
    from ckpt_analysis.registry import Columns


@dataclass(frozen=True)
class ParamLayout:
    """The flattened layout of the analysed parameters: names, shapes, offsets (in-memory names)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_model(cls, model: nn.Module, patterns: list[str]) -> ParamLayout:
        """Parameters whose in-memory name matches any glob in ``patterns``, in model order."""
        params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if _matches(n, patterns)]
        if not params:
            sample = ", ".join(n for n, _ in list(model.named_parameters())[:6])
            raise JobSpecError(f"parameter patterns {patterns} match no parameter; names look like: {sample}")
        return cls(tuple(n for n, _ in params), tuple(s for _, s in params))

    @classmethod
    def from_config(cls, model_config: dict[str, Any], patterns: list[str]) -> ParamLayout:
        """The layout without loading weights (the model is built on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**model_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model, patterns)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([int(np.prod(s)) for s in self.shapes], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @property
    def size(self) -> int:
        return int(self.sizes.sum())

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The model's values of these parameters as one vector (detached)."""
        named = dict(model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A vector in this layout as ``{name: tensor}`` views."""
        parts = vector.split(self.sizes.tolist())
        return {n: c.view(s) for n, c, s in zip(self.names, parts, self.shapes, strict=True)}

    def tables(self) -> Columns:
        """Store columns over the ``param_tensor`` dimension."""
        dims = ("param_tensor",)
        shapes = np.array(["x".join(map(str, s)) or "scalar" for s in self.shapes], dtype=object)
        return {
            "param_name": (dims, np.array(self.names, dtype=object)),
            "param_shape": (dims, shapes),
            "param_offset": (dims, self.offsets),
            "param_size": (dims, self.sizes),
        }


def as_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` itself if already in ``dtype``, else a converted copy (the cached model stays as is)."""
    target = getattr(torch, dtype)
    if next(model.parameters()).dtype == target:
        return model
    return copy.deepcopy(model).to(target)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class HessianOperator:
    """``v ↦ H v`` for the mean cross-entropy over the scored tokens of a fixed sample.

    The model runs in eval mode with a plain differentiable attention; only parameters in
    ``layout`` require grad. HVPs use double backward (reverse-over-reverse), never the dense
    Hessian. ``matvecs`` counts HVPs. Not thread-safe: it toggles ``requires_grad`` on the model.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, sample: EvalData, *, batch_size: int) -> None:
        named = dict(model.named_parameters())
        for name, param in named.items():
            param.requires_grad_(name in layout.names)
        self.model = model.eval()
        self.layout = layout
        self.params = [named[n] for n in layout.names]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.batches = list(sample.batches(batch_size, self.device))
        self.count = int(sample.score_mask.sum())
        self.matvecs = 0

    @property
    def n(self) -> int:
        return self.layout.size

    def flat_params(self) -> torch.Tensor:
        return self.layout.flatten(self.model)

    def _batch_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return scored_token_losses(self.model, *batch).sum() / self.count

    def loss(self) -> float:
        """Mean scored-token cross-entropy over the sample."""
        with torch.no_grad(), differentiable_attention(self.model):
            return float(sum(self._batch_loss(b) for b in self.batches))

    def gradient(self) -> torch.Tensor:
        """∇θ of the mean loss (flattened)."""
        total = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with differentiable_attention(self.model):
            for batch in self.batches:
                grads = torch.autograd.grad(self._batch_loss(batch), self.params)
                total += torch.cat([g.reshape(-1) for g in grads])
        return total

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H v by double backward, summed over the sample's batches."""
        parts = list(self.layout.unflatten(v.to(self.dtype)).values())
        total = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with differentiable_attention(self.model):
            for batch in self.batches:
                grads = torch.autograd.grad(self._batch_loss(batch), self.params, create_graph=True)
                dot = torch.stack([(g * p).sum() for g, p in zip(grads, parts, strict=True)]).sum()
                hv = torch.autograd.grad(dot, self.params)
                total += torch.cat([h.reshape(-1) for h in hv])
        self.matvecs += 1
        return total
