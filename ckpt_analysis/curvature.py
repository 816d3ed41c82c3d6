"""Curvature operators (Hessian, GGN, empirical Fisher) of the mean token loss; the parameter layout."""

from __future__ import annotations

import copy
import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import functional_call, jvp, vjp

from ckpt_analysis.attention import differentiable_attention
from ckpt_analysis.data import EvalData
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.losses import scored_token_losses
from ckpt_analysis.types import Batch

if TYPE_CHECKING:
    from ckpt_analysis.types import Columns


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


Params = dict[str, torch.Tensor]


class CurvatureOperator(ABC):
    """``v ↦ C v`` for a curvature matrix C of the mean cross-entropy over the scored tokens of a
    fixed sample (docs/hessian.md, "Operators"), summed over the sample's batches.

    The model runs in eval mode with a plain differentiable attention; only parameters in
    ``layout`` require grad. Matrix-free: C is never formed. ``matvecs`` counts products. Not
    thread-safe: it toggles ``requires_grad`` on the model, and θ must not change while it is used.
    """

    name: ClassVar[str]

    def __init__(self, model: nn.Module, layout: ParamLayout, sample: EvalData, *, batch_size: int) -> None:
        named = dict(model.named_parameters())
        for name, param in named.items():
            param.requires_grad_(name in layout.names)
        self.model = model.eval()
        self.layout = layout
        self.params = [named[n] for n in layout.names]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.batches: list[Batch] = list(sample.batches(batch_size, self.device))
        self.count = int(sample.score_mask.sum())
        self.matvecs = 0

    @property
    def n(self) -> int:
        return self.layout.size

    def flat_params(self) -> torch.Tensor:
        return self.layout.flatten(self.model)

    def _batch_loss(self, batch: Batch) -> torch.Tensor:
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
        """C v, summed over the sample's batches."""
        tangent = self.layout.unflatten(v.to(self.dtype))
        total = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with differentiable_attention(self.model):
            for i, batch in enumerate(self.batches):
                total += torch.cat([part.reshape(-1) for part in self._product(i, batch, tangent)])
        self.matvecs += 1
        return total

    def rounding(self, vectors: torch.Tensor, values: np.ndarray) -> float:
        """The measured relative rounding error ρ of this operator's product on the pairs
        (θᵢ = ``values[i]``, yᵢ = ``vectors[i]``): each ‖(Ĉ − C) yᵢ‖ is about ≤ ρ |θᵢ|
        (docs/hessian.md, "The measured floor").

        One product of the combination z = Σᵢ sᵢ yᵢ / |θᵢ| (seeded signs sᵢ = ±1) is made twice,
        here and on a float64 twin of the model, and ρ = ‖Ĉz − Cz‖: its square is about
        Σᵢ (‖(Ĉ − C) yᵢ‖ / |θᵢ|)², which bounds every term. Zero for a float64 operator. Costs one
        product in this dtype, one in float64 (one batch's graph at a time), and a float64 copy of
        the model while it runs.
        """
        if self.dtype == torch.float64:
            return 0.0
        scale = np.maximum(np.abs(values), 1e-6 * np.abs(values).max())  # a zero θ weighs as a tiny one
        signs = torch.randint(0, 2, (len(values),), generator=torch.Generator().manual_seed(0)) * 2 - 1
        z = torch.from_numpy(signs.numpy() / scale).to(vectors) @ vectors
        return float((self(z).double() - self._twin(torch.float64)(z.double())).norm())

    def _twin(self, dtype: torch.dtype) -> Self:
        """This operator over a ``dtype`` copy of the model, sharing any state drawn from the data
        (the MC Fisher's targets)."""
        twin = copy.copy(self)
        twin.model = torch.nn.Module.to(copy.deepcopy(self.model), dtype)  # transformers mis-types .to
        named = dict(twin.model.named_parameters())
        twin.params = [named[n] for n in self.layout.names]
        twin.dtype = dtype
        return twin

    @abstractmethod
    def _product(self, index: int, batch: Batch, tangent: Params) -> tuple[torch.Tensor, ...]:
        """One batch's share of C v, per parameter tensor of the layout."""

    def _functional(self, batch: Batch) -> tuple[Params, Callable[[Params], Any]]:
        """The layout's parameters as a primal, and the model called on them (others held fixed)."""
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        primal = {n: base[n] for n in self.layout.names}
        ids, mask, _ = batch

        def run(params: Params) -> Any:
            return functional_call(
                self.model, {**base, **params}, args=(), kwargs={"input_ids": ids, "attention_mask": mask}
            )

        return primal, run

    def _logits(self, batch: Batch) -> tuple[Params, Callable[[Params], torch.Tensor]]:
        """The layout's parameters as a primal, and the scored tokens' logits as their function."""
        primal, run = self._functional(batch)
        scored = batch[2][:, 1:].bool()

        def logits(params: Params) -> torch.Tensor:
            return torch.as_tensor(run(params).logits[:, :-1][scored])

        return primal, logits


class HessianOperator(CurvatureOperator):
    """The Hessian H by double backward (reverse-over-reverse), never formed densely.

    With ``cache_graph`` (default) each batch's gradient graph is built once, on the first product,
    and every later product is one backward pass through it: one HVP then costs about 1.7–2.2×
    one gradient instead of ~3× (docs/benchmarks.md). The price is memory: the graphs of every
    batch of the sample stay alive, about 2–3× the activations of one training step per batch.
    """

    name = "hessian"

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        sample: EvalData,
        *,
        batch_size: int,
        cache_graph: bool = True,
    ) -> None:
        super().__init__(model, layout, sample, batch_size=batch_size)
        self.cache_graph = cache_graph
        self._graphs: dict[int, tuple[torch.Tensor, ...]] = {}

    def _product(self, index: int, batch: Batch, tangent: Params) -> tuple[torch.Tensor, ...]:
        grads = self._graphs.get(index)
        if grads is None:
            grads = torch.autograd.grad(self._batch_loss(batch), self.params, create_graph=True)
            if self.cache_graph:
                self._graphs[index] = grads
        parts = [tangent[n] for n in self.layout.names]
        return torch.autograd.grad(grads, self.params, grad_outputs=parts, retain_graph=self.cache_graph)

    def _twin(self, dtype: torch.dtype) -> Self:
        twin = super()._twin(dtype)
        twin._graphs, twin.cache_graph = {}, False  # the graphs belong to this operator's model
        return twin


class GGNOperator(CurvatureOperator):
    """The generalised Gauss–Newton matrix G = (1/N) Σ_x J_xᵀ H_x J_x (docs/hessian.md, "Operators").

    J_x is the Jacobian of token x's logits z_x, H_x = diag(p_x) − p_x p_xᵀ the Hessian of its
    cross-entropy in z_x (p_x = softmax(z_x)). Positive semi-definite. A product is one forward-mode
    pass (J v) and one reverse pass (Jᵀ u).
    """

    name = "ggn"

    def _product(self, index: int, batch: Batch, tangent: Params) -> tuple[torch.Tensor, ...]:
        primal, logits = self._logits(batch)
        z, jv = jvp(logits, (primal,), ({n: tangent[n] for n in primal},))[:2]
        p = torch.softmax(z, dim=-1)
        u = (p * jv - p * (p * jv).sum(dim=-1, keepdim=True)) / self.count
        pullback = vjp(logits, primal)[1]
        (grads,) = pullback(u)
        return tuple(grads[n] for n in self.layout.names)


class FisherOperator(CurvatureOperator):
    """The empirical Fisher F = (1/N) Σ_x g_x g_xᵀ, g_x = ∇θ ℓ(x) (docs/hessian.md, "Operators").

    Positive semi-definite; equal to the Hessian only where the model's predictive distribution
    matches the data's, not away from a minimum. A product is one forward-mode pass (every
    g_xᵀ v at once) and one reverse pass.
    """

    name = "fisher"

    def _product(self, index: int, batch: Batch, tangent: Params) -> tuple[torch.Tensor, ...]:
        primal, run = self._functional(batch)

        def losses(params: Params) -> torch.Tensor:
            return scored_token_losses(lambda **kw: run(params), *batch)  # type: ignore[arg-type]

        slopes = jvp(losses, (primal,), ({n: tangent[n] for n in primal},))[1]
        pullback = vjp(losses, primal)[1]
        (grads,) = pullback(slopes / self.count)
        return tuple(grads[n] for n in self.layout.names)


class MCFisherOperator(CurvatureOperator):
    """The Monte Carlo *true* Fisher F̂ = (1/N) Σ_x (1/S) Σ_s g_{x,s} g_{x,s}ᵀ, g_{x,s} = ∇θ ℓ(x; y_s)
    with targets y_s ~ p_x drawn from the model itself (docs/hessian.md, "Operators").

    For cross-entropy E[F̂] = G, the GGN: g_{x,s} = J_xᵀ r_s with r_s = p_x − e_{y_s}, and
    E[r rᵀ] = diag(p_x) − p_x p_xᵀ. Each batch's S targets per token are drawn once, at its first
    product (seeded, ``targets[batch]``: (token, sample)), so F̂ is one fixed PSD matrix. A product
    is one forward-mode pass and one reverse pass, as for the empirical Fisher.
    """

    name = "fisher_mc"

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        sample: EvalData,
        *,
        batch_size: int,
        seed: int = 0,
        samples: int = 1,
    ) -> None:
        super().__init__(model, layout, sample, batch_size=batch_size)
        self.samples = samples
        self.targets: dict[int, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def _product(self, index: int, batch: Batch, tangent: Params) -> tuple[torch.Tensor, ...]:
        primal, logits = self._logits(batch)
        z, jv = jvp(logits, (primal,), ({n: tangent[n] for n in primal},))[:2]
        p = torch.softmax(z, dim=-1)
        y = self._drawn(index, p)
        slopes = (p * jv).sum(dim=-1, keepdim=True) - jv.gather(-1, y)  # r_s · J v, (token, sample)
        u = p * slopes.sum(dim=-1, keepdim=True)
        u = u.scatter_add(-1, y, -slopes) / (self.samples * self.count)  # Σ_s r_s (r_s · J v) / (S N)
        pullback = vjp(logits, primal)[1]
        (grads,) = pullback(u)
        return tuple(grads[n] for n in self.layout.names)

    def _drawn(self, index: int, p: torch.Tensor) -> torch.Tensor:
        """Batch ``index``'s targets, drawn from ``p`` (the model at θ) on its first product."""
        if index not in self.targets:
            probs = p.detach().double().cpu()
            drawn = torch.multinomial(probs, self.samples, replacement=True, generator=self._generator)
            self.targets[index] = drawn.to(p.device)
        return self.targets[index]


OPERATORS: dict[str, type[CurvatureOperator]] = {
    op.name: op for op in (HessianOperator, GGNOperator, FisherOperator, MCFisherOperator)
}
"""The curvature operators a Hessian analysis can use (``operator = "hessian" | "ggn" | "fisher" |
"fisher_mc"``)."""


CurvatureKind = Literal["hessian", "ggn", "fisher", "fisher_mc"]


def curvature_operator(
    model: nn.Module,
    data: EvalData | np.ndarray | torch.Tensor,
    *,
    kind: CurvatureKind = "hessian",
    params: list[str] | None = None,
    batch_size: int = 32,
) -> CurvatureLinearOperator:
    """The curvature matrix of ``model``'s mean token loss on ``data`` as a SciPy ``LinearOperator``
    (docs/hessian.md, "The operators for your own solver"), for ``eigsh``, ``cg``, ``lsqr`` or
    any solver that takes one.

    Parameters
    ----------
    model
        A causal LM (transformers' or a plain ``nn.Module`` returning ``.logits``).
    data
        An :class:`~ckpt_analysis.data.EvalData` (its scored tokens), or token ids
        ``(sequence, position)``, every target after the first scored.
    kind
        ``"hessian"`` (H), ``"ggn"`` (the generalised Gauss–Newton), ``"fisher"`` (the empirical
        Fisher) or ``"fisher_mc"`` (the true Fisher, one target per token sampled from the model,
        seed 0): docs/hessian.md, "Operators".
    params
        Globs over in-memory parameter names (default: every parameter); the operator acts on
        their flattened concatenation, in model order (``.layout`` names it).
    batch_size
        Sequences per forward pass.

    Notes
    -----
    The operator holds ``model``: it turns ``requires_grad`` off for the parameters outside
    ``params`` and puts the model in eval mode. Not thread-safe; θ must not change while it is
    used. ``matmat`` makes one product per column (no pass over the graph is shared between
    columns). Vectors are NumPy arrays in the model's dtype, moved to its device for each product.

    Examples
    --------
    >>> from scipy.sparse.linalg import eigsh  # doctest: +SKIP
    >>> H = curvature_operator(model, ids, kind="hessian")  # doctest: +SKIP
    >>> top = eigsh(H, k=5, which="LA", return_eigenvectors=False)  # doctest: +SKIP
    """
    if kind not in OPERATORS:
        raise JobSpecError(f"kind = {kind!r} is not valid; choose one of: {', '.join(map(repr, OPERATORS))}")
    layout = ParamLayout.from_model(model, params or ["*"])
    return CurvatureLinearOperator(OPERATORS[kind](model, layout, _eval_data(data), batch_size=batch_size))


def _eval_data(data: EvalData | np.ndarray | torch.Tensor) -> EvalData:
    if isinstance(data, EvalData):
        return data
    ids = np.asarray(data.cpu() if isinstance(data, torch.Tensor) else data, dtype=np.int64)
    if ids.ndim != 2:
        raise JobSpecError(f"data must be token ids of shape (sequence, position); got shape {ids.shape}")
    return EvalData(ids, np.ones_like(ids), np.ones(ids.shape, dtype=bool))


class CurvatureLinearOperator(LinearOperator):  # type: ignore[misc]  # scipy is untyped
    """A :class:`CurvatureOperator` as a symmetric SciPy ``LinearOperator`` (:func:`curvature_operator`)."""

    def __init__(self, curvature: CurvatureOperator) -> None:
        dtype = torch.empty(0, dtype=curvature.dtype).numpy().dtype
        super().__init__(dtype=dtype, shape=(curvature.n, curvature.n))
        self.curvature = curvature
        self.layout = curvature.layout

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        c = self.curvature
        v = torch.as_tensor(np.asarray(x, dtype=self.dtype).reshape(-1)).to(c.device)
        product: np.ndarray = c(v).detach().cpu().numpy()
        return product

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return np.column_stack([self._matvec(column) for column in np.asarray(x).T])

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # symmetric

    def _adjoint(self) -> CurvatureLinearOperator:
        return self
