"""Output diagnostics per token and checkpoint, and their means per label value (docs/diagnostics.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ckpt_analysis.data import label_names, label_variable
from ckpt_analysis.losses import scored_logits
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register

METRICS = ("loss", "entropy", "top1_prob", "correct", "target_rank")


def output_diagnostics(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """docs/diagnostics.md: per token, in :data:`METRICS` order, with p = softmax(z):
    loss −log p_y, entropy −Σ_v p_v log p_v, top-1 probability max_v p_v, correct@1
    [argmax_v z_v = y], and the target's rank #{v : z_v > z_y} (0 = the top guess)."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    target_logit = logits.gather(1, targets[:, None])
    return torch.stack(
        [
            -logp.gather(1, targets[:, None])[:, 0],
            -(logp.exp() * logp).sum(dim=-1),
            logp.max(dim=-1).values.exp(),
            (logits.argmax(dim=-1) == targets).to(torch.float64),
            (logits > target_logit).sum(dim=-1).to(torch.float64),
        ],
        dim=1,
    )


def means_by_value(values: np.ndarray, label: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """docs/diagnostics.md: the mean of each column of ``values`` over the tokens at each label
    level, ``(metric, level)``; NaN for a level with no token."""
    out = np.full((values.shape[1], len(levels)), np.nan)
    for j, level in enumerate(levels):
        chosen = label == level
        if chosen.any():
            out[:, j] = values[chosen].mean(axis=0)
    return out


@dataclass(frozen=True)
class DiagnosticsParams:
    """``[analyses.diagnostics]`` takes no options."""


@register
class Diagnostics(Analysis[DiagnosticsParams]):
    """``diag_token (step, token, diag_metric)`` and, per label column L, ``diag_by_L (step,
    diag_metric, L_value)``: the same means over the tokens at each label value."""

    name = "diagnostics"

    @staticmethod
    def _levels(ctx: PlanContext) -> dict[str, np.ndarray]:
        labels = ctx.eval_data.token_labels()
        return {name: np.unique(labels[name]) for name in label_names(ctx.job.data)}

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        levels = {f"{name}_value": v for name, v in self._levels(ctx).items()}
        return {"diag_metric": np.array(METRICS, dtype=object), **levels}

    def variables(self, ctx: PlanContext) -> list[Variable]:
        s, m = len(ctx.checkpoints), len(METRICS)
        grid = {"step": s, "token": ctx.num_tokens, "diag_metric": m}
        out = [Variable.of("diag_token", grid, "float32", doc="loss, entropy, top-1 prob, correct@1, rank")]
        for name, levels in self._levels(ctx).items():
            doc = f"mean of each diagnostic over the tokens at each value of label {name!r}"
            sizes = {"step": s, "diag_metric": m, f"{name}_value": len(levels)}
            out.append(Variable.of(f"diag_by_{name}", sizes, doc=doc))
        return out

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        model = ctx.load_model(unit.checkpoint)
        device = next(model.parameters()).device
        parts = []
        with torch.no_grad():
            for batch in ctx.eval_data.batches(ctx.job.compute.batch_size, device):
                parts.append(output_diagnostics(*scored_logits(model, *batch)).cpu())
        values = torch.cat(parts).numpy()
        by_label = [
            Write(
                f"diag_by_{name}",
                (unit.checkpoint,),
                means_by_value(values, ctx.read(label_variable(name)), ctx.read(f"{name}_value")),
            )
            for name in label_names(ctx.job.data)
        ]
        return [Write("diag_token", (unit.checkpoint,), values.astype(np.float32)), *by_label]
