"""Representation geometry per checkpoint, site and layer: TwoNN intrinsic dimension, PCA
dimensions and participation ratio of a seeded token sample (docs/geometry.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel

from ckpt_analysis.analyses.covariance import Covariance, participation_ratio
from ckpt_analysis.config import require_distinct
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.sites import activations_at
from ckpt_analysis.types import Site

PCA_FRACTIONS = (0.9, 0.95)
_DISTANCE_ROWS = 256
Points = Literal["token", "sequence", "mean"]


# --- docs/geometry.md formulas ---


def nearest_two(points: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Each point's distances r1 ≤ r2 to its first and second nearest other point, exact
    (differences, not the ‖x‖² − 2x·y + ‖y‖² shortcut, so a duplicate is at distance 0)."""
    points = points.to(torch.float64)
    r = torch.empty(points.shape[0], 2, dtype=torch.float64)
    for start in range(0, points.shape[0], _DISTANCE_ROWS):
        rows = points[start : start + _DISTANCE_ROWS]
        dist = torch.cdist(rows, points, compute_mode="donot_use_mm_for_euclid_dist")
        dist[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = float("inf")
        r[start : start + len(rows)] = dist.topk(2, dim=1, largest=False).values.cpu()
    return r[:, 0].numpy(), r[:, 1].numpy()


def two_nn(r1: np.ndarray, r2: np.ndarray, *, discard: float = 0.1) -> tuple[float, int]:
    """docs/geometry.md, "TwoNN": the intrinsic dimension and the number of points dropped.

    μ = r2/r1 per point; points with r1 = 0 (duplicates) are dropped and counted; of the N left,
    the n = ⌊N(1 − discard)⌋ smallest μ are kept; d is the least-squares slope through the origin
    of −log(1 − F) on log μ, F_i = i/N. NaN when fewer than two points are kept.
    """
    distinct = r1 > 0
    mu = np.sort(r2[distinct] / r1[distinct])
    n = len(mu)
    keep = int(n * (1 - discard))
    if keep < 2:
        return float("nan"), int((~distinct).sum())
    x = np.log(mu[:keep])
    y = -np.log(1 - np.arange(1, keep + 1) / n)
    return float(x @ y / (x @ x)), int((~distinct).sum())


def sequence_points(acts: torch.Tensor, sequences: int, kind: Points) -> torch.Tensor:
    """docs/geometry.md, "Point kinds": the ``(sequences · L, d)`` activations of equal-length
    sequences' scored positions (row-major) as one point per sequence: flattened to ``L · d``
    (``sequence``, TRACE's) or mean-pooled to ``d`` (``mean``); ``token`` keeps them as they are."""
    if kind == "token":
        return acts
    per_sequence = acts.reshape(sequences, -1, acts.shape[-1])
    return per_sequence.reshape(sequences, -1) if kind == "sequence" else per_sequence.mean(dim=1)


def spectrum_matrix(points: np.ndarray) -> np.ndarray:
    """The sample covariance ``numpy.cov`` (d × d), or with fewer points than dimensions the
    centred Gram matrix X̃X̃ᵀ/(N − 1) (N × N): the same non-zero eigenvalues, traces and
    tr(·²), so the same PCA dimensions and participation ratio at a fraction of the cost."""
    if points.shape[0] >= points.shape[1]:
        return np.asarray(np.cov(points, rowvar=False))
    centred = points - points.mean(axis=0)
    return np.asarray(centred @ centred.T / (points.shape[0] - 1))


def pca_dimension(eigvals: np.ndarray, fraction: float) -> int:
    """docs/geometry.md, "PCA dimension": the fewest principal components whose variances sum to
    at least ``fraction`` of the total."""
    share = np.cumsum(np.sort(eigvals)[::-1]) / eigvals.sum()
    return int(np.searchsorted(share, fraction - 1e-12) + 1)


@dataclass(frozen=True)
class GeometryParams:
    """``[analyses.geometry]`` options."""

    sites: list[Site] = field(default_factory=lambda: ["resid_post"])
    points: Points | list[Points] = "token"
    """What one point is: a scored token, a whole sequence flattened (TRACE's), or its mean; a
    list measures each kind, along the ``point_kind`` dimension."""
    sample_tokens: int = 2000
    sample_sequences: int = 128
    """``points = "sequence"`` or ``"mean"``: sequences in the seeded sample, all of one length."""
    seed: int = 0
    discard_fraction: float = 0.1

    def __post_init__(self) -> None:
        require_distinct(self.sites, "analyses.geometry.sites")
        require_distinct(self.kinds, "analyses.geometry.points")
        for key in ("sample_tokens", "sample_sequences"):
            if getattr(self, key) < 3:
                raise JobSpecError(f"analyses.geometry.{key} = {getattr(self, key)} must be at least 3")
        if not 0 <= self.discard_fraction < 1:
            raise JobSpecError(
                f"analyses.geometry.discard_fraction = {self.discard_fraction} must be in [0, 1)"
            )

    @property
    def kinds(self) -> list[Points]:
        """The point kinds measured, in the order of the ``point_kind`` coordinate."""
        return [self.points] if isinstance(self.points, str) else list(self.points)


@register
class Geometry(Analysis[GeometryParams]):
    """TwoNN, PCA dimensions and participation ratio over (step, point_kind, geom_site, layer), one
    unit per checkpoint, on the same seeded sample of each point kind at every checkpoint."""

    name = "geometry"

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        return {
            "point_kind": np.array(self.params.kinds, dtype=object),
            "geom_site": np.array(self.params.sites, dtype=object),
            "pca_fraction": np.array(PCA_FRACTIONS),
        }

    def variables(self, ctx: PlanContext) -> list[Variable]:
        grid = {
            "step": len(ctx.checkpoints),
            "point_kind": len(self.params.kinds),
            "geom_site": len(self.params.sites),
            "layer": int(ctx.model_config["num_hidden_layers"]),
        }
        return [
            Variable.of("geom_twonn", grid, doc="TwoNN intrinsic dimension of the sample"),
            Variable.of("geom_twonn_dropped", grid, "int64", doc="points dropped: nearest neighbour at 0"),
            Variable.of(
                "geom_pca_dim",
                {**grid, "pca_fraction": len(PCA_FRACTIONS)},
                "int64",
                doc="principal components for 90 % / 95 % of the variance",
            ),
            Variable.of("geom_participation", grid, doc="participation ratio (tr Σ)² / tr Σ²"),
            Variable.of("geom_points", grid, "int64", doc="points (tokens or sequences) in the sample"),
        ]

    def units(self, ctx: PlanContext) -> list[Unit]:
        """Per checkpoint; after that checkpoint's ``covariance`` unit when its matrix is reused."""
        units = super().units(ctx)
        if not self._reused_sites(ctx):
            return units
        return [replace(u, deps=(f"{Covariance.name}/{u.key}",)) for u in units]

    def _reused_sites(self, ctx: PlanContext | UnitContext) -> dict[Site, int]:
        """Sites whose token-point PCA numbers come from the job's stored ``covariance`` matrix
        (docs/geometry.md, "Reusing covariance"), with their index along its ``site`` axis: those it
        covers over the same scored tokens, when it is listed before ``geometry``."""
        names = list(ctx.job.analyses)
        if (
            "token" not in self.params.kinds
            or Covariance.name not in names
            or names.index(Covariance.name) > names.index(self.name)
        ):
            return {}
        cov = Covariance.from_spec(ctx.job.analyses[Covariance.name]).params
        if cov.positions != "scored":
            return {}
        return {site: cov.sites.index(site) for site in self.params.sites if site in cov.sites}

    def sample(self, ctx: PlanContext | UnitContext, kind: Points) -> np.ndarray:
        """``(sequences, positions)`` mask of the sampled scored tokens, or with sequence points of
        every scored position of the sampled sequences: the same at every checkpoint."""
        if kind != "token":
            return self._sequence_sample(ctx.eval_data.score_mask)
        seq, pos = ctx.eval_data.token_index
        rng = np.random.default_rng(self.params.seed)
        pick = rng.choice(len(seq), size=min(self.params.sample_tokens, len(seq)), replace=False)
        mask = np.zeros(ctx.eval_data.score_mask.shape, dtype=bool)
        mask[seq[pick], pos[pick]] = True
        return mask

    def _sequence_sample(self, score_mask: np.ndarray) -> np.ndarray:
        """docs/geometry.md, "Point kinds": a seeded sample of the sequences with the commonest
        number of scored positions (the longer on a tie), so no point mixes in padding."""
        counts = score_mask.sum(axis=1)
        tally = np.bincount(counts[counts > 0])
        length = int(np.flatnonzero(tally == tally.max())[-1])
        eligible = np.flatnonzero(counts == length)
        rng = np.random.default_rng(self.params.seed)
        pick = rng.choice(eligible, size=min(self.params.sample_sequences, len(eligible)), replace=False)
        mask = np.zeros(score_mask.shape, dtype=bool)
        mask[pick] = score_mask[pick]
        return mask

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        model = ctx.load_model(unit.checkpoint)
        reused = self._reused_sites(ctx)
        stored = ctx.read("act_cov", rows=slice(unit.checkpoint, unit.checkpoint + 1))[0] if reused else None
        grid = [self._measure_kind(model, ctx, kind, reused, stored) for kind in self.params.kinds]
        names = ("geom_twonn", "geom_twonn_dropped", "geom_pca_dim", "geom_participation", "geom_points")
        return [
            Write(
                name, (unit.checkpoint,), np.array([[[c[k] for c in row] for row in rows] for rows in grid])
            )
            for k, name in enumerate(names)
        ]

    def _measure_kind(
        self,
        model: PreTrainedModel,
        ctx: UnitContext,
        kind: Points,
        reused: dict[Site, int],
        stored: np.ndarray | None,
    ) -> list[list[tuple[float, int, list[int], float, int]]]:
        """One point kind's measures per (site, layer), on that kind's sample; token points take
        the stored covariance of the ``reused`` sites."""
        data, sites, sample = ctx.eval_data, tuple(self.params.sites), self.sample(ctx, kind)
        acts = activations_at(
            model,
            sites,
            data.input_ids,
            data.attention_mask,
            sample,
            batch_size=ctx.job.compute.batch_size,
            dtype=torch.float64,
        )
        sequences = int(sample.any(axis=1).sum())

        def measure(site: Site, layer: int) -> tuple[float, int, list[int], float, int]:
            reuse = kind == "token" and site in reused
            cov = stored[reused[site], layer] if reuse and stored is not None else None
            return self._measure(sequence_points(acts[(site, layer)], sequences, kind), cov)

        layers = int(ctx.model_config["num_hidden_layers"])
        return [[measure(s, i) for i in range(layers)] for s in sites]

    def _measure(
        self, points: torch.Tensor, cov: np.ndarray | None
    ) -> tuple[float, int, list[int], float, int]:
        dimension, dropped = two_nn(*nearest_two(points), discard=self.params.discard_fraction)
        cov = spectrum_matrix(points.numpy()) if cov is None else cov.astype(np.float64)
        eigvals = np.clip(np.linalg.eigvalsh(cov), 0, None)
        pca = [pca_dimension(eigvals, f) for f in PCA_FRACTIONS]
        return dimension, dropped, pca, float(participation_ratio(cov)), len(points)
