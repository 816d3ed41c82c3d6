"""Output diagnostics per token and checkpoint, and their means per label value (docs/diagnostics.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ckpt_analysis.batching import batch_size
from ckpt_analysis.config import require_distinct
from ckpt_analysis.data import EvalData, label_names, label_variable, vocabulary_labels
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.losses import scored_logits
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.sites import row_index
from ckpt_analysis.types import Columns

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


ABSENT = -1
"""The label value of a position without a label (padding, an unlabelled word)."""


def token_label_map(input_ids: np.ndarray, labels: np.ndarray, vocab_size: int) -> np.ndarray:
    """docs/diagnostics.md, "Category match": each vocabulary id's label, read off every labelled
    position of the token set; :data:`ABSENT` for an id no labelled position holds.

    Raises ``ValueError`` naming the first id seen with two labels: the label is then not a
    function of the token.
    """
    ids, values = input_ids[labels != ABSENT], labels[labels != ABSENT]
    out = np.full(vocab_size, ABSENT, dtype=np.int64)
    out[ids] = values
    clash = np.flatnonzero(out[ids] != values)
    if len(clash):
        token = int(ids[clash[0]])
        raise ValueError(f"token {token} has labels {int(out[token])} and {int(values[clash[0]])}")
    return out


def category_matches(predicted: np.ndarray, target_label: np.ndarray, label_of: np.ndarray) -> np.ndarray:
    """docs/diagnostics.md, "Category match": per scored token, 1 if its argmax token has the
    target's label (TRACE's POS / role match), else 0; NaN where the target has no label."""
    matched = (label_of[predicted] == target_label).astype(np.float64)
    return np.where(target_label != ABSENT, matched, np.nan)


@dataclass(frozen=True)
class DiagnosticsParams:
    """``[analyses.diagnostics]`` options."""

    category_match: list[str] = field(default_factory=list)
    """Label columns that are a function of the token (the grammar's ``pos``) whose category match
    is stored as ``diag_match (step, match_label)`` and, per value, ``diag_match_by_<label>``."""

    def __post_init__(self) -> None:
        if self.category_match:
            require_distinct(self.category_match, "analyses.diagnostics.category_match")


@register
class Diagnostics(Analysis[DiagnosticsParams]):
    """``diag_token (step, token, diag_metric)``; per label column L, ``diag_by_L (step,
    diag_metric, L_value)``: the same means over the tokens at each label value; with
    ``category_match``, ``diag_match (step, match_label)`` and ``diag_match_by_L (step, L_value)``."""

    name = "diagnostics"

    def check(self, ctx: PlanContext) -> None:
        """``category_match`` names label columns of the token set that are functions of the
        token; any other is refused by name."""
        names = label_names(ctx.job.data)
        for name in self.params.category_match:
            if name not in names:
                valid = ", ".join(map(repr, names)) or "none: this token set has no label columns"
                raise JobSpecError(f"analyses.diagnostics.category_match names {name!r}; labels: {valid}")
        self._label_maps(ctx)

    def tables(self, ctx: PlanContext) -> Columns:
        """``diag_match_map (match_label, match_token)``: each ``category_match`` column's token →
        label map (docs/diagnostics.md, "Category match")."""
        if not self.params.category_match:
            return {}
        return {"diag_match_map": (("match_label", "match_token"), np.stack(self._label_maps(ctx)))}

    def _label_maps(self, ctx: PlanContext) -> list[np.ndarray]:
        vocab_size = int(ctx.model_config["vocab_size"])
        known = vocabulary_labels(ctx.job.data, ctx.tokenizer, vocab_size)
        return [
            known[name] if name in known else self._label_map(ctx.eval_data, name, vocab_size)
            for name in self.params.category_match
        ]

    @staticmethod
    def _label_map(data: EvalData, name: str, vocab_size: int) -> np.ndarray:
        try:
            return token_label_map(data.input_ids, data.labels[name], vocab_size)
        except ValueError as err:
            raise JobSpecError(
                f"analyses.diagnostics.category_match: label {name!r} is not a function of the token "
                f"({err}), so a predicted token has no category; drop it from category_match"
            ) from None

    @staticmethod
    def _levels(ctx: PlanContext) -> dict[str, np.ndarray]:
        labels = ctx.eval_data.token_labels()
        return {name: np.unique(labels[name]) for name in label_names(ctx.job.data)}

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        levels = {f"{name}_value": v for name, v in self._levels(ctx).items()}
        matched = {"match_label": np.array(self.params.category_match, dtype=object)}
        return {
            "diag_metric": np.array(METRICS, dtype=object),
            **levels,
            **(matched if self.params.category_match else {}),
        }

    def variables(self, ctx: PlanContext) -> list[Variable]:
        s, m = len(ctx.checkpoints), len(METRICS)
        grid = {"step": s, "token": ctx.num_tokens, "diag_metric": m}
        out = [Variable.of("diag_token", grid, "float32", doc="loss, entropy, top-1 prob, correct@1, rank")]
        levels = self._levels(ctx)
        for name, values in levels.items():
            doc = f"mean of each diagnostic over the tokens at each value of label {name!r}"
            sizes = {"step": s, "diag_metric": m, f"{name}_value": len(values)}
            out.append(Variable.of(f"diag_by_{name}", sizes, doc=doc))
        if self.params.category_match:
            doc = "share of labelled scored tokens whose argmax token has the target's label"
            out.append(
                Variable.of(
                    "diag_match", {"step": s, "match_label": len(self.params.category_match)}, doc=doc
                )
            )
        for name in self.params.category_match:
            doc = f"the same share among the tokens at each value of label {name!r} (TRACE's per-tag match)"
            sizes = {"step": s, f"{name}_value": len(levels[name])}
            out.append(Variable.of(f"diag_match_by_{name}", sizes, doc=doc))
        return out

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        model = ctx.load_model(unit.checkpoint)
        device = next(model.parameters()).device
        data, size = ctx.eval_data, batch_size(ctx, model, "logits")
        parts, predicted = [], []
        with torch.no_grad():  # kept on the device until the last batch: no wait inside the loop
            for part, (ids, attn, _) in zip(data.slices(size), data.batches(size, device), strict=True):
                scored = row_index(data.score_mask[part], device)
                logits, targets = scored_logits(model, ids, attn, scored)
                parts.append(output_diagnostics(logits, targets))
                predicted.append(logits.argmax(dim=-1))
        values = torch.cat(parts).cpu().numpy()
        by_label = [
            Write(
                f"diag_by_{name}",
                (unit.checkpoint,),
                means_by_value(values, ctx.read(label_variable(name)), ctx.read(f"{name}_value")),
            )
            for name in label_names(ctx.job.data)
        ]
        writes = [Write("diag_token", (unit.checkpoint,), values.astype(np.float32)), *by_label]
        return writes + self._matches(ctx, unit.checkpoint, torch.cat(predicted).cpu().numpy())

    def _matches(self, ctx: UnitContext, row: int, predicted: np.ndarray) -> list[Write]:
        if not self.params.category_match:
            return []
        overall, writes = [], []
        for name, label_of in zip(self.params.category_match, ctx.read("diag_match_map"), strict=True):
            target = ctx.read(label_variable(name))
            matches = category_matches(predicted, target, label_of)
            overall.append(np.nanmean(matches) if np.isfinite(matches).any() else np.nan)
            per_value = means_by_value(matches[:, None], target, ctx.read(f"{name}_value"))[0]
            writes.append(Write(f"diag_match_by_{name}", (row,), per_value))
        return [Write("diag_match", (row,), np.array(overall)), *writes]
