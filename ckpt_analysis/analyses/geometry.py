"""Representation geometry per checkpoint, site and layer: TwoNN intrinsic dimension, PCA
dimensions and participation ratio of a seeded token sample (docs/geometry.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel

from ckpt_analysis.analyses.covariance import Covariance, participation_ratio
from ckpt_analysis.batching import batch_size
from ckpt_analysis.config import require_distinct
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.sites import activations_at
from ckpt_analysis.types import Site

PCA_FRACTIONS = (0.9, 0.95)
_DISTANCE_ROWS = 256
Points = Literal["token", "sequence", "mean"]
Measures = tuple[float, int, list[int], float, int]
"""One sample's TwoNN dimension, points dropped, PCA dimensions, participation ratio, points."""
Grid = list[list[Measures]]
"""Measures per site, then per layer."""


# --- docs/geometry.md formulas ---


def nearest_two(points: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Each point's distances r1 ≤ r2 to its first and second nearest other point, exact
    (differences, not the ‖x‖² − 2x·y + ‖y‖² shortcut, so a duplicate is at distance 0)."""
    points = points.to(torch.float64)
    r = torch.empty(points.shape[0], 2, dtype=torch.float64)
    for start in range(0, points.shape[0], _DISTANCE_ROWS):
        rows = points[start : start + _DISTANCE_ROWS]
        dist = torch.cdist(rows, points, compute_mode="donot_use_mm_for_euclid_dist")
        r[start : start + len(rows)] = _two_smallest_off_diagonal(dist, start).cpu()
    return r[:, 0].numpy(), r[:, 1].numpy()


def _two_smallest_off_diagonal(dist: torch.Tensor, start: int) -> torch.Tensor:
    """``(rows, 2)``: each row's two smallest distances to a point other than itself, for the rows
    of an ``(rows, N)`` distance block that begins at point ``start``."""
    rows = torch.arange(dist.shape[0], device=dist.device)
    dist[rows, rows + start] = float("inf")
    return dist.topk(2, dim=1, largest=False).values


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


def position_chunks(sample: np.ndarray, positions: int) -> list[np.ndarray]:
    """docs/geometry.md, "Streaming sequence points": the cells of a sample of sequences with equal
    numbers of scored positions, split by rank into masks of ``positions`` ranks each (the k-th
    scored position of every sampled sequence in the same chunk), in order."""
    rank = np.cumsum(sample, axis=1) - 1
    length = int(sample.sum(axis=1).max())
    return [sample & (rank >= k) & (rank < k + positions) for k in range(0, length, positions)]


@dataclass
class SequenceCloud:
    """docs/geometry.md, "Streaming sequence points": one site-layer's sequence points summed chunk
    by chunk of positions, never held whole. ``sequence`` points (each sequence's positions
    flattened) keep exact pairwise squared distances and the centred Gram matrix, both N × N sums
    over chunks; ``mean`` points keep each sequence's position sum, N × d."""

    kinds: tuple[Points, ...]
    sq_distances: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    positions: int = 0

    def add(self, chunk: torch.Tensor) -> None:
        """Fold in the ``(sequences, positions, d)`` float64 activations of the next positions:
        ‖xᵢ − xⱼ‖² is the sum over chunks of the chunks' exact squared distances, and centring by
        the mean over sequences is per coordinate, so each chunk is centred on its own."""
        if "sequence" in self.kinds:
            flat = chunk.reshape(len(chunk), -1)
            sq = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") ** 2
            centred = flat - flat.mean(dim=0)
            gram = centred @ centred.T
            self.sq_distances = sq if self.sq_distances is None else self.sq_distances + sq
            self.gram = gram if self.gram is None else self.gram + gram
        if "mean" in self.kinds:
            total = chunk.sum(dim=1)
            self.sums = total if self.sums is None else self.sums + total
        self.positions += chunk.shape[1]


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
    sequence_memory_mb: float = 1024.0
    """``points = "sequence"`` or ``"mean"``: the most memory the gathered activations of one pass
    take (float64, every site and layer); scored positions are gathered in chunks that fit, one
    forward pass over the sampled sequences' prefixes per chunk."""
    seed: int = 0
    discard_fraction: float = 0.1

    def __post_init__(self) -> None:
        require_distinct(self.sites, "analyses.geometry.sites")
        require_distinct(self.kinds, "analyses.geometry.points")
        for key in ("sample_tokens", "sample_sequences"):
            if getattr(self, key) < 3:
                raise JobSpecError(f"analyses.geometry.{key} = {getattr(self, key)} must be at least 3")
        if not self.sequence_memory_mb > 0:
            raise JobSpecError(
                f"analyses.geometry.sequence_memory_mb = {self.sequence_memory_mb} must be positive"
            )
        if not 0 <= self.discard_fraction < 1:
            raise JobSpecError(
                f"analyses.geometry.discard_fraction = {self.discard_fraction} must be in [0, 1)"
            )

    @property
    def kinds(self) -> list[Points]:
        """The point kinds measured, in the order of the ``point_kind`` coordinate."""
        return [self.points] if isinstance(self.points, str) else list(self.points)

    @property
    def sequence_kinds(self) -> tuple[Points, ...]:
        """The kinds streamed over the sampled sequences (docs/geometry.md, "Streaming sequence points")."""
        return tuple(k for k in self.kinds if k != "token")


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

    def check(self, ctx: PlanContext) -> None:
        """Sequence points: one scored position of every sampled sequence must fit the budget."""
        if not self.params.sequence_kinds:
            return
        sample = self.sample(ctx, "sequence")
        if self._chunk_positions(ctx, sample) < 1:
            need = self._position_bytes(ctx, sample) / 1e6
            raise JobSpecError(
                f"analyses.geometry.sequence_memory_mb = {self.params.sequence_memory_mb} holds less "
                f"than one scored position of the sampled sequences ({need:.3g} MB: sequences × "
                "hidden size × 8 B × sites × layers); raise it or lower sample_sequences"
            )

    def _position_bytes(self, ctx: PlanContext | UnitContext, sample: np.ndarray) -> int:
        """Bytes one scored position of every sequence of ``sample`` takes, gathered in float64."""
        sequences = int(sample.any(axis=1).sum())
        config = ctx.model_config
        per_layer = sequences * int(config["hidden_size"]) * 8 * len(self.params.sites)
        return per_layer * int(config["num_hidden_layers"])

    def _chunk_positions(self, ctx: PlanContext | UnitContext, sample: np.ndarray) -> int:
        """docs/geometry.md, "Streaming sequence points": scored positions gathered per pass."""
        return int(self.params.sequence_memory_mb * 1e6 // self._position_bytes(ctx, sample))

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        model = ctx.load_model(unit.checkpoint)
        kinds = self.params.kinds
        measured: dict[Points, Grid] = {}
        if "token" in kinds:
            measured["token"] = self._measure_tokens(model, ctx, unit.checkpoint)
        if self.params.sequence_kinds:
            measured |= self._measure_sequences(model, ctx, self.params.sequence_kinds)
        names = ("geom_twonn", "geom_twonn_dropped", "geom_pca_dim", "geom_participation", "geom_points")
        values = [measured[kind] for kind in kinds]
        return [
            Write(
                name, (unit.checkpoint,), np.array([[[c[k] for c in row] for row in rows] for rows in values])
            )
            for k, name in enumerate(names)
        ]

    def _gather(
        self, model: PreTrainedModel, ctx: UnitContext, mask: np.ndarray
    ) -> dict[tuple[Site, int], torch.Tensor]:
        """Float64 activations at ``mask``, forwards over only the prefix it reaches, kept on the
        model's device."""
        data, end = ctx.eval_data, int(np.flatnonzero(mask.any(axis=0))[-1]) + 1
        return activations_at(
            model,
            tuple(self.params.sites),
            data.input_ids[:, :end],
            data.attention_mask[:, :end],
            mask[:, :end],
            batch_size=batch_size(ctx, model, "forward"),
            dtype=torch.float64,
            on_device=True,
        )

    def _measure_tokens(self, model: PreTrainedModel, ctx: UnitContext, checkpoint: int) -> Grid:
        """Token points' measures per (site, layer), on their seeded sample; the stored covariance
        of the reused sites gives their PCA numbers."""
        reused = self._reused_sites(ctx)
        stored = ctx.read("act_cov", rows=slice(checkpoint, checkpoint + 1))[0] if reused else None
        acts = self._gather(model, ctx, self.sample(ctx, "token"))

        def measure(site: Site, layer: int) -> Measures:
            cov = stored[reused[site], layer] if stored is not None and site in reused else None
            return self._measure(acts[(site, layer)], cov)

        layers = int(ctx.model_config["num_hidden_layers"])
        return [[measure(s, i) for i in range(layers)] for s in self.params.sites]

    def _measure_sequences(
        self, model: PreTrainedModel, ctx: UnitContext, kinds: tuple[Points, ...]
    ) -> dict[Points, Grid]:
        """docs/geometry.md, "Streaming sequence points": sequence and mean points' measures per
        (site, layer) from one stream over their shared sample, a chunk of positions per pass."""
        sites, layers = self.params.sites, int(ctx.model_config["num_hidden_layers"])
        sample = self.sample(ctx, "sequence")
        sequences = int(sample.any(axis=1).sum())
        clouds = {(s, i): SequenceCloud(kinds) for s in sites for i in range(layers)}
        for chunk in position_chunks(sample, self._chunk_positions(ctx, sample)):
            for key, acts in self._gather(model, ctx, chunk).items():
                clouds[key].add(acts.reshape(sequences, -1, acts.shape[-1]))
        return {
            kind: [[self._measure_cloud(clouds[s, i], kind) for i in range(layers)] for s in sites]
            for kind in kinds
        }

    def _measure_cloud(self, cloud: SequenceCloud, kind: Points) -> Measures:
        """Mean points from their sums; sequence points from their N × N distances and Gram matrix
        (the Gram matrix has the covariance's non-zero eigenvalues: docs/geometry.md)."""
        if kind == "mean":
            assert cloud.sums is not None
            return self._measure(cloud.sums / cloud.positions, None)
        assert cloud.sq_distances is not None and cloud.gram is not None
        r = _two_smallest_off_diagonal(cloud.sq_distances.sqrt(), 0).cpu().numpy()
        dimension, dropped = two_nn(r[:, 0], r[:, 1], discard=self.params.discard_fraction)
        return self._spectrum((dimension, dropped), cloud.gram.cpu().numpy() / (len(r) - 1), len(r))

    def _measure(self, points: torch.Tensor, cov: np.ndarray | None) -> Measures:
        dimension, dropped = two_nn(*nearest_two(points), discard=self.params.discard_fraction)
        cov = spectrum_matrix(points.cpu().numpy()) if cov is None else cov.astype(np.float64)
        return self._spectrum((dimension, dropped), cov, len(points))

    @staticmethod
    def _spectrum(twonn: tuple[float, int], cov: np.ndarray, points: int) -> Measures:
        """The measures of a sample of ``points``: its TwoNN result, and the PCA numbers of its
        covariance (or centred Gram) matrix ``cov``."""
        eigvals = np.clip(np.linalg.eigvalsh(cov), 0, None)
        pca = [pca_dimension(eigvals, f) for f in PCA_FRACTIONS]
        return *twonn, pca, float(participation_ratio(cov)), points
