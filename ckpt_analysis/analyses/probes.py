"""Linear probes per checkpoint, site, layer and label, each beside a Hewitt & Liang control task
(docs/probes.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ckpt_analysis.batching import batch_size
from ckpt_analysis.config import require_distinct
from ckpt_analysis.data import label_names, label_variable
from ckpt_analysis.errors import DataError, JobSpecError
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.sites import activations_at
from ckpt_analysis.types import Columns, Site

# --- docs/probes.md formulas ---


def split_tokens(
    sequences: np.ndarray, labelled: np.ndarray, *, sample: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """docs/probes.md, "Split": indices of the train and test tokens.

    Whole sequences go to the test side (a seeded shuffle, the first ``test_fraction`` of them),
    so no sequence is on both sides; of the ``labelled`` tokens, at most ``sample`` are kept, a
    seeded choice in the same proportion on each side.
    """
    rng = np.random.default_rng(seed)
    unique = np.unique(sequences)
    test_seqs = rng.permutation(unique)[: max(1, round(test_fraction * len(unique)))]
    on_test = np.isin(sequences, test_seqs)
    candidates = np.flatnonzero(labelled)
    keep = rng.permutation(candidates)[:sample] if len(candidates) > sample else candidates
    keep = np.sort(keep)
    return keep[~on_test[keep]], keep[on_test[keep]]


def control_labels(types: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """docs/probes.md, "Control task" (Hewitt & Liang 2019): each token type gets one label drawn
    from the empirical label distribution, and every token of that type carries it."""
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels, return_counts=True)
    kinds, inverse = np.unique(types, return_inverse=True)
    drawn = rng.choice(values, size=len(kinds), p=counts / counts.sum())
    return drawn[inverse]


def probe_accuracy(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *, c: float, max_iter: int
) -> float:
    """docs/probes.md, "Probe": held-out accuracy of multinomial logistic regression (L2, inverse
    strength ``c``) on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = train
    if len(np.unique(y)) < 2:  # one class on the train side: the probe can only answer it
        return float(np.mean(test[1] == y[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(x, y)
    return float(probe.score(*test))


@dataclass(frozen=True)
class ProbesParams:
    """``[analyses.probes]`` options."""

    labels: list[str] | None = None
    """Label columns to probe; default every label column of the data."""
    sites: list[Site] = field(default_factory=lambda: ["resid_post"])
    sample_tokens: int = 4000
    test_fraction: float = 0.25
    seed: int = 0
    c: float = 1.0
    max_iter: int = 500

    def __post_init__(self) -> None:
        require_distinct(self.sites, "analyses.probes.sites")
        if self.sample_tokens < 10:
            raise JobSpecError(f"analyses.probes.sample_tokens = {self.sample_tokens} must be at least 10")
        if not 0 < self.test_fraction < 1:
            raise JobSpecError(f"analyses.probes.test_fraction = {self.test_fraction} must be in (0, 1)")
        if self.c <= 0 or self.max_iter < 1:
            raise JobSpecError("analyses.probes.c must be positive and max_iter at least 1")


@register
class Probes(Analysis[ProbesParams]):
    """``probe_accuracy``, ``probe_control_accuracy`` and ``probe_selectivity`` over (step,
    probe_site, layer, probe_label), one unit per checkpoint; the split, sample and control
    labels are fixed by the seed and the same at every checkpoint."""

    name = "probes"

    def _labels(self, ctx: PlanContext | UnitContext) -> list[str]:
        """The labels probed: the option, else every label column of the data."""
        return label_names(ctx.job.data) if self.params.labels is None else self.params.labels

    def _splits(
        self, ctx: PlanContext | UnitContext, labels: dict[str, np.ndarray]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        seq, _ = ctx.eval_data.token_index
        p = self.params
        return {
            name: split_tokens(
                seq, labels[name] >= 0, sample=p.sample_tokens, test_fraction=p.test_fraction, seed=p.seed
            )
            for name in self._labels(ctx)
        }

    def check(self, ctx: PlanContext) -> None:
        """Every label is a column of the data, and its split has a test side and two values on the
        train side."""
        available, chosen = label_names(ctx.job.data), self._labels(ctx)
        unknown = [name for name in chosen if name not in available]
        if unknown or not chosen:
            raise JobSpecError(
                f"analyses.probes.labels {unknown or chosen} not among the data's label columns: "
                + (", ".join(available) or f"data.source = {ctx.job.data.source!r} has none")
            )
        labels = ctx.eval_data.token_labels()
        for name, (train, test) in self._splits(ctx, labels).items():
            problem = (
                "no token on the test side" if not len(test) else "fewer than two values on the train side"
            )
            if not len(test) or len(np.unique(labels[name][train])) < 2:
                raise DataError(
                    f"label {name!r} has {problem} of the probes; "
                    "raise data.num_examples or analyses.probes.test_fraction"
                )

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        return {
            "probe_label": np.array(self._labels(ctx), dtype=object),
            "probe_site": np.array(self.params.sites, dtype=object),
            "probe_side": np.array(["train", "test"], dtype=object),
        }

    def tables(self, ctx: PlanContext) -> Columns:
        labels = ctx.eval_data.token_labels()
        splits = self._splits(ctx, labels)
        sizes = np.array([[len(train), len(test)] for train, test in splits.values()])
        majority = [  # docs/probes.md: the accuracy of always guessing the test side's commonest class
            np.unique(labels[n][test], return_counts=True)[1].max() / len(test)
            for n, (_, test) in splits.items()
        ]
        return {
            "probe_tokens": (("probe_label", "probe_side"), sizes),
            "probe_majority": (("probe_label",), np.array(majority)),
        }

    def variables(self, ctx: PlanContext) -> list[Variable]:
        grid = {
            "step": len(ctx.checkpoints),
            "probe_site": len(self.params.sites),
            "layer": int(ctx.model_config["num_hidden_layers"]),
            "probe_label": len(self._labels(ctx)),
        }
        return [
            Variable.of("probe_accuracy", grid, doc="held-out accuracy of the linear probe"),
            Variable.of("probe_control_accuracy", grid, doc="the same probe on the control task"),
            Variable.of("probe_selectivity", grid, doc="probe_accuracy - probe_control_accuracy"),
        ]

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        names = self._labels(ctx)
        labels = {n: ctx.read(label_variable(n)) for n in names}
        splits = self._splits(ctx, labels)
        seq, pos = ctx.eval_data.token_index
        types = ctx.eval_data.input_ids[seq, pos]
        wanted = np.unique(np.concatenate([i for pair in splits.values() for i in pair]))
        acts = self._activations(unit.checkpoint, ctx, seq[wanted], pos[wanted])
        layers = int(ctx.model_config["num_hidden_layers"])
        shape = (len(self.params.sites), layers, len(names))
        accuracy, control = np.full(shape, np.nan), np.full(shape, np.nan)
        for k, name in enumerate(names):
            train, test = splits[name]
            a, b = np.searchsorted(wanted, train), np.searchsorted(wanted, test)
            both = np.concatenate([train, test])
            fake = control_labels(types[both], labels[name][both], self.params.seed)
            for (i, j), x in acts.items():
                accuracy[i, j, k] = self._fit((x[a], labels[name][train]), (x[b], labels[name][test]))
                control[i, j, k] = self._fit((x[a], fake[: len(train)]), (x[b], fake[len(train) :]))
        return [
            Write("probe_accuracy", (unit.checkpoint,), accuracy),
            Write("probe_control_accuracy", (unit.checkpoint,), control),
            Write("probe_selectivity", (unit.checkpoint,), accuracy - control),
        ]

    def _fit(self, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
        return probe_accuracy(train, test, c=self.params.c, max_iter=self.params.max_iter)

    def _activations(
        self, checkpoint: int, ctx: UnitContext, seq: np.ndarray, pos: np.ndarray
    ) -> dict[tuple[int, int], np.ndarray]:
        """``(site index, layer) → (token, d)`` activations at the given tokens (sorted by sequence,
        so row-major order is token order)."""
        mask = np.zeros(ctx.eval_data.score_mask.shape, dtype=bool)
        mask[seq, pos] = True
        sites = tuple(self.params.sites)
        data, model = ctx.eval_data, ctx.load_model(checkpoint)
        acts = activations_at(
            model,
            sites,
            data.input_ids,
            data.attention_mask,
            mask,
            batch_size=batch_size(ctx, model, "forward"),
            dtype=torch.float32,
        )
        return {(sites.index(site), layer): x.numpy() for (site, layer), x in acts.items()}
