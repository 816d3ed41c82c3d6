"""Leading-term basis functions: corpus statistics, token covariances, alignment (docs/leading_terms.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from ckpt_analysis.config import require_distinct
from ckpt_analysis.corpus import (
    check_right_padded,
    row_block,
    shuffle_tokens,
    stream_corpus_statistics,
    top_vocabulary,
    vocab_index,
)
from ckpt_analysis.device import resolve_device
from ckpt_analysis.errors import JobSpecError
from ckpt_analysis.models.onehot import MODEL_TYPE
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.sites import capture, decoder_layers
from ckpt_analysis.tasks import topics
from ckpt_analysis.types import Site

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ckpt_analysis.config import JobSpec
    from ckpt_analysis.types import Columns

TokenSite = Literal["resid_pre", "resid_mid", "resid_post"]
TOKEN_SITES: tuple[TokenSite, ...] = ("resid_pre", "resid_mid", "resid_post")
"""Layer input, after attention (input + attention output), after the layer (docs/leading_terms.md)."""
CORPORA = ("real", "shuffled")
STATS = ("bigram", "context", "interchange", "value", "g", "qk")
ACTIVATION_COMPARISONS = ("value_resid_pre", "value_resid_mid", "value_resid_post", "qk", "qk_T")
WEIGHT_COMPARISONS = ("WO_bigram", "V_value", "W_qk", "W_qk_T", "P_delta")
TARGETS = ("value", "qk", "qk_T")
"""The alignment targets, computed once per job by ``lt_alignment/targets`` (docs/leading_terms.md)."""
TOKEN_BATCH = 1024
TARGETS_UNIT = "targets"


# --- docs/leading_terms.md formulas ---


def rowcov(e: torch.Tensor) -> torch.Tensor:
    """Token-indexed covariance (docs/leading_terms.md): rows are variables, columns observations."""
    e = e.to(torch.float64)
    centred = e - e.mean(dim=1, keepdim=True)
    return centred @ centred.T / (e.shape[1] - 1)


def rownorm(m: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit Euclidean norm; all-zero rows stay zero (docs/leading_terms.md)."""
    norm = m.norm(dim=1, keepdim=True)
    return m / torch.where(norm > 0, norm, 1.0)


def attention_rowcov(pre: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``rowcov(A_tok)``, ``A_tok = E_pre M E_preᵀ`` (docs/leading_terms.md, "Alignment"), without
    forming A_tok: centring each row of A_tok over its K columns gives E_pre M Ẽᵀ with
    Ẽ = E_pre − 1ēᵀ (ē the token mean), so rowcov(A_tok) = E_pre W E_preᵀ with
    W = M ẼᵀẼ Mᵀ / (K − 1). O(K²d + Kd²) instead of O(K³)."""
    pre, m = pre.to(torch.float64), m.to(torch.float64)
    centred = pre - pre.mean(dim=0, keepdim=True)
    w = m @ (centred.T @ centred) @ m.T / (pre.shape[0] - 1)
    return pre @ w @ pre.T


def alignment_targets(value: torch.Tensor, qk: torch.Tensor) -> list[torch.Tensor]:
    """The prediction side of docs/leading_terms.md, "Alignment": rowcov(rownorm(·)) of V*, Q̄
    and Q̄ᵀ, in :data:`TARGETS` order."""
    return [rowcov(rownorm(t.to(torch.float64))) for t in (value, qk, qk.T)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The metric (docs/leading_terms.md): uncentred cosine, ``tr(AᵀB) / (‖A‖_F ‖B‖_F)``."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a * b).sum() / (a.norm() * b.norm()))


def query_key_matrix(layer: Any, *, fold_ln: bool) -> torch.Tensor:
    """Head-mean ``W_Q W_Kᵀ`` (d × d) of a GPT-NeoX layer, LayerNorm gain folded in if asked.

    GPT-NeoX's fused ``query_key_value`` holds, per head, q, k and v rows in that order.
    """
    attn = layer.attention
    heads = int(attn.config.num_attention_heads)
    weight = attn.query_key_value.weight.detach().to(torch.float64)
    q, k, _ = weight.view(heads, 3, -1, weight.shape[1]).unbind(dim=1)  # (heads, d_head, d)
    if fold_ln:
        gain = layer.input_layernorm.weight.detach().to(torch.float64)
        q, k = q * gain, k * gain
    return torch.einsum("hai,haj->ij", q, k) / heads


def layer_norm_input(x: torch.Tensor, layer: Any) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)``: the attention LayerNorm without gain and bias."""
    x = x.to(torch.float64)
    return nn.functional.layer_norm(x, x.shape[-1:], eps=float(layer.input_layernorm.eps))


def token_activations(
    model: Any, token_ids: np.ndarray, *, bos: int | None
) -> dict[TokenSite, list[torch.Tensor]]:
    """Per site and layer, the ``(K, d)`` activations of each token fed alone (docs/covariance.md).

    Each token is a length-1 sequence (or ``<bos> token`` when ``bos`` is given; the last
    position is kept). ``resid_mid`` is the layer input plus the attention output: what the
    residual stream holds after attention, for sequential and GPT-NeoX parallel blocks alike.
    """
    device = next(model.parameters()).device
    layers = len(decoder_layers(model))
    hooked: tuple[Site, ...] = ("resid_pre", "attn_out", "resid_post")
    parts: dict[str, list[list[torch.Tensor]]] = {s: [[] for _ in range(layers)] for s in hooked}

    def keep(site: Site, layer: int, acts: torch.Tensor) -> None:
        parts[site][layer].append(acts[:, -1])

    ids = torch.as_tensor(token_ids, device=device)[:, None]
    if bos is not None:
        ids = torch.cat([torch.full_like(ids, bos), ids], dim=1)
    with torch.inference_mode(), capture(model, hooked, keep):
        for start in range(0, ids.shape[0], TOKEN_BATCH):
            model.base_model(input_ids=ids[start : start + TOKEN_BATCH])
    pre, attn, post = ([torch.cat(chunks) for chunks in parts[s]] for s in hooked)
    return {
        "resid_pre": pre,
        "resid_mid": [p + a for p, a in zip(pre, attn, strict=True)],
        "resid_post": post,
    }


def _k_by_k(name: str, sizes: dict[str, int], dtype: str, doc: str) -> Variable:
    """A variable ending in two vocab axes (``vocab``, ``vocab_b``), chunked in the row blocks
    :func:`~ckpt_analysis.corpus.row_block` streams (~16 MB)."""
    chunk = {"vocab": row_block(sizes["vocab_b"])}
    return Variable.of(name, sizes, dtype, unit_axes=len(sizes) - 2, chunk=chunk, doc=doc)


def _inputs_per_sequence(ctx: PlanContext) -> int:
    """T: each sequence of T + 1 tokens gives inputs x_1 … x_T (docs/leading_terms.md)."""
    return int(ctx.eval_data.input_ids.shape[1]) - 1


@dataclass(frozen=True)
class CorpusStatsParams:
    """``[analyses.corpus_stats]`` options."""

    vocab_size: int = 1000
    shuffle_seed: int = 0
    chunk_sequences: int = 64
    store_dtype: Literal["float32", "float64"] = "float32"


@register
class CorpusStatsAnalysis(Analysis[CorpusStatsParams]):
    """B̄, Φ̄, Σ_B̄, V*, G, Q̄ and Δ of the job's token set and of its token-shuffled twin: one unit."""

    name = "corpus_stats"

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        return {
            "vocab": np.arange(self.params.vocab_size),
            "corpus": np.array(CORPORA, dtype=object),
            "distance": np.arange(_inputs_per_sequence(ctx)),
        }

    def check(self, ctx: PlanContext) -> None:
        """Sequences are right-padded (the statistics read each sequence's prefix)."""
        check_right_padded(ctx.eval_data.attention_mask)

    def tables(self, ctx: PlanContext) -> Columns:
        data = ctx.eval_data
        ids, counts = top_vocabulary(data.input_ids, data.attention_mask, self.params.vocab_size)
        decode = ctx.tokenizer.decode if ctx.tokenizer else lambda i: str(i[0])  # no tokenizer: the id
        text = np.array([decode([int(i)]) for i in ids], dtype=object)
        return {
            "vocab_id": (("vocab",), ids),
            "vocab_text": (("vocab",), text),
            "vocab_count": (("vocab",), counts),
        }

    def variables(self, ctx: PlanContext) -> list[Variable]:
        k, dtype = self.params.vocab_size, self.params.store_dtype
        sizes = {"corpus": len(CORPORA), "vocab": k, "vocab_b": k}
        docs = {
            "bigram": "B̄: rows current token, columns next token",
            "context": "Φ̄: rows target token, columns prefix token",
            "interchange": "Σ_B̄ = B̄ᵀB̄",
            "value": "V* = Φ̄ᵀB̄ᵀ, the value-matrix prediction",
            "g": "G = Φ̄ᵀΣ_B̄",
            "qk": "Q̄: rows query token, columns key token",
        }
        per_corpus = {"corpus": len(CORPORA)}
        return [
            *(_k_by_k(f"lt_{s}", sizes, dtype, docs[s]) for s in STATS),
            Variable.of("lt_delta", {**per_corpus, "distance": _inputs_per_sequence(ctx)}, doc="Δ_m"),
            Variable.of("lt_pairs", per_corpus, "int64", doc="NT, positions averaged"),
        ]

    def units(self, ctx: PlanContext) -> list[Unit]:
        return [Unit(self.name, "corpus")]

    def compute(self, unit: Unit, ctx: UnitContext) -> Iterator[Write]:
        """Streams its blocks as they are computed (the K×K results of both corpora together would
        not fit in memory at K = 20,000; ``stream_corpus_statistics`` holds at most 16K² bytes)."""
        data = ctx.eval_data
        vocab = ctx.read("vocab_id")
        device = resolve_device(ctx.job.checkpoints.device)
        corpora = (
            data.input_ids,
            shuffle_tokens(data.input_ids, data.attention_mask, self.params.shuffle_seed),
        )
        for row, ids in enumerate(corpora):
            stream = stream_corpus_statistics(
                vocab_index(ids, vocab),
                data.attention_mask,
                self.params.vocab_size,
                chunk=self.params.chunk_sequences,
                device=device,
                dtype=getattr(torch, self.params.store_dtype),
            )
            for name, rows, values in stream:
                index = (row,) if name in ("delta", "pairs") else (row, rows)
                yield Write(f"lt_{name}", index, values.cpu().numpy())


def _check_token_model(ctx: PlanContext, analysis: str, *, bos: bool) -> None:
    """The model is a GPT-NeoX (its attention weights are read), with a BOS token if ``bos``."""
    if bos and ctx.model_config.get("bos_token_id") is None:
        raise JobSpecError(f"analyses.{analysis}.bos = true but the model config has no bos_token_id")
    model_type = ctx.model_config.get("model_type")
    if model_type != "gpt_neox":
        hint = f"; for {MODEL_TYPE!r} use lt_alignment mode = 'weights'" if analysis == "lt_alignment" else ""
        raise JobSpecError(
            f"analyses.{analysis} reads GPT-NeoX attention weights; model_type {model_type!r} "
            f"is not supported (supported: 'gpt_neox'{hint})"
        )


@dataclass(frozen=True)
class TokenCovParams:
    """``[analyses.token_cov]`` options."""

    sites: list[TokenSite] = field(default_factory=lambda: ["resid_post"])
    form: Literal["factor", "cov"] = "factor"
    """``factor``: the activations E (K × d), whose ``numpy.cov`` is the matrix, d/K of its size;
    ``cov``: the K × K matrix itself (docs/leading_terms.md, "Token-indexed covariance")."""
    bos: bool = False
    store_dtype: Literal["float32", "float64"] = "float32"

    def __post_init__(self) -> None:
        require_distinct(self.sites, "analyses.token_cov.sites")


@register
class TokenCov(Analysis[TokenCovParams]):
    """Token-indexed activations ``token_act`` (step, layer, token_site, vocab, hidden), or their
    row covariance ``token_cov`` (step, layer, token_site, vocab, vocab_b) with ``form = "cov"``."""

    name = "token_cov"

    def requires(self) -> tuple[type[Analysis[Any]], ...]:
        return (CorpusStatsAnalysis,)

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        return {"token_site": np.array(self.params.sites, dtype=object)}

    def variables(self, ctx: PlanContext) -> list[Variable]:
        k = CorpusStatsAnalysis.from_spec(ctx.job.analyses[CorpusStatsAnalysis.name]).params.vocab_size
        sizes = {
            "step": len(ctx.checkpoints),
            "layer": int(ctx.model_config["num_hidden_layers"]),
            "token_site": len(self.params.sites),
            "vocab": k,
        }
        dtype = self.params.store_dtype
        if self.params.form == "cov":
            doc = "numpy.cov(E), tokens as variables"
            return [_k_by_k("token_cov", {**sizes, "vocab_b": k}, dtype, doc)]
        hidden = int(ctx.model_config["hidden_size"])
        doc = "E: each vocabulary token's activation, fed alone; numpy.cov(E) is token_cov"
        return [Variable.of("token_act", {**sizes, "hidden": hidden}, dtype, unit_axes=1, doc=doc)]

    def check(self, ctx: PlanContext) -> None:
        _check_token_model(ctx, self.name, bos=self.params.bos)

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        assert unit.checkpoint is not None
        model = ctx.load_model(unit.checkpoint)
        acts = token_activations(model, ctx.read("vocab_id"), bos=_bos(ctx, self.params.bos))
        keep = rowcov if self.params.form == "cov" else _float64
        values = [
            [keep(acts[s][layer]).cpu().numpy() for s in self.params.sites]
            for layer in range(len(acts["resid_pre"]))
        ]
        name = "token_cov" if self.params.form == "cov" else "token_act"
        return [Write(name, (unit.checkpoint,), np.array(values))]


def _float64(e: torch.Tensor) -> torch.Tensor:
    return e.to(torch.float64)


def _bos(ctx: UnitContext, wanted: bool) -> int | None:
    """The BOS id to feed before each token, if ``wanted`` (checked at plan time to exist)."""
    return int(ctx.model_config["bos_token_id"]) if wanted else None


@dataclass(frozen=True)
class AlignmentParams:
    """``[analyses.lt_alignment]`` options."""

    mode: Literal["auto", "activations", "weights"] = "auto"
    fold_ln: bool = True
    bos: bool = False


@register
class LeadingTermAlignment(Analysis[AlignmentParams]):
    """``lt_score`` (step, layer, comparison, corpus): uncentred cosines with the predicted terms."""

    name = "lt_alignment"

    def requires(self) -> tuple[type[Analysis[Any]], ...]:
        return (CorpusStatsAnalysis,)

    def mode(self, model_config: dict[str, object]) -> Literal["activations", "weights"]:
        if self.params.mode != "auto":
            return self.params.mode
        return "weights" if model_config.get("model_type") == MODEL_TYPE else "activations"

    def _comparisons(self, ctx: PlanContext) -> tuple[str, ...]:
        return WEIGHT_COMPARISONS if self.mode(ctx.model_config) == "weights" else ACTIVATION_COMPARISONS

    def coords(self, ctx: PlanContext) -> dict[str, np.ndarray]:
        coords = {"comparison": np.array(self._comparisons(ctx), dtype=object)}
        if self.mode(ctx.model_config) == "activations":
            coords["lt_target"] = np.array(TARGETS, dtype=object)
        return coords

    def variables(self, ctx: PlanContext) -> list[Variable]:
        sizes = {
            "step": len(ctx.checkpoints),
            "layer": int(ctx.model_config["num_hidden_layers"]),
            "comparison": len(self._comparisons(ctx)),
            "corpus": len(CORPORA),
        }
        doc = "uncentred cosine with the leading-term prediction (docs/leading_terms.md)"
        score = Variable.of("lt_score", sizes, doc=doc)
        if self.mode(ctx.model_config) == "weights":
            return [score]
        stats = CorpusStatsAnalysis.from_spec(ctx.job.analyses[CorpusStatsAnalysis.name]).params
        k = stats.vocab_size
        grid = {"corpus": len(CORPORA), "lt_target": len(TARGETS), "vocab": k, "vocab_b": k}
        return [score, _k_by_k("lt_target_cov", grid, stats.store_dtype, "rowcov(rownorm(·)) of V*, Q̄, Q̄ᵀ")]

    def check(self, ctx: PlanContext) -> None:
        """Weights mode needs the one-hot model; activations mode a GPT-NeoX and step 0 (the null)."""
        mode = self.mode(ctx.model_config)
        if mode == "weights" and ctx.model_config.get("model_type") != MODEL_TYPE:
            raise JobSpecError(
                f"lt_alignment mode = 'weights' needs the {MODEL_TYPE!r} model (the paper's Def. 3.1)"
            )
        if mode == "activations":
            _check_token_model(ctx, self.name, bos=self.params.bos)
            if ctx.checkpoints[0].step != 0:
                raise JobSpecError(
                    "lt_alignment reports step 0 as its null baseline; "
                    "include step 0 in the checkpoint selection"
                )

    def units(self, ctx: PlanContext) -> list[Unit]:
        mode = self.mode(ctx.model_config)
        deps = ("corpus_stats/corpus",)
        shared: list[Unit] = []
        if mode == "activations":  # the targets, once per job (docs/leading_terms.md, "Alignment")
            shared = [Unit(self.name, TARGETS_UNIT, None, deps)]
            deps = (shared[0].id,)
        per_step = [Unit(self.name, f"step={c.step}", i, deps) for i, c in enumerate(ctx.checkpoints)]
        return shared + per_step

    def compute(self, unit: Unit, ctx: UnitContext) -> list[Write]:
        if unit.checkpoint is None:
            return self._targets(ctx)
        model = ctx.load_model(unit.checkpoint)
        vocab = ctx.read("vocab_id")
        if self.mode(ctx.model_config) == "weights":
            scores = self._weights(model, vocab, ctx)
        else:
            scores = self._activations(model, vocab, ctx)
        return [Write("lt_score", (unit.checkpoint,), scores)]

    def _targets(self, ctx: UnitContext) -> list[Write]:
        """``lt_target_cov``: the targets of both corpora, on the job's device, once per job."""
        device = resolve_device(ctx.job.checkpoints.device)
        value, qk = ctx.read("lt_value"), ctx.read("lt_qk")
        writes = []
        for r in range(len(CORPORA)):
            v, q = (torch.from_numpy(m[r]).to(device) for m in (value, qk))
            for j, target in enumerate(alignment_targets(v, q)):
                writes.append(Write("lt_target_cov", (r, j), target.cpu().numpy()))
        return writes

    def _activations(self, model: nn.Module, vocab: np.ndarray, ctx: UnitContext) -> np.ndarray:
        """(layer, comparison, corpus) scores against the job's stored targets, on the model's device."""
        device = next(model.parameters()).device
        stored = torch.from_numpy(ctx.read("lt_target_cov")).to(device, torch.float64)
        targets = [stored[r] for r in range(len(CORPORA))]
        acts = token_activations(model, vocab, bos=_bos(ctx, self.params.bos))
        out = []
        for index, layer in enumerate(decoder_layers(model)):
            pre = acts["resid_pre"][index]
            pre = layer_norm_input(pre, layer) if self.params.fold_ln else pre.to(torch.float64)
            m = query_key_matrix(layer, fold_ln=self.params.fold_ln).to(pre.device)
            attn = attention_rowcov(pre, m)
            covs = [rowcov(acts[s][index]) for s in TOKEN_SITES]
            out.append(
                [[*(cosine(c, t[0]) for c in covs), cosine(attn, t[1]), cosine(attn, t[2])] for t in targets]
            )
        return np.array(out).transpose(0, 2, 1)

    def _weights(self, model: Any, vocab: np.ndarray, ctx: UnitContext) -> np.ndarray:
        """(layer, comparison, corpus) scores of the one-hot model's weights (docs/leading_terms.md)."""
        stats = {s: torch.from_numpy(ctx.read(f"lt_{s}")) for s in ("bigram", "value", "qk", "delta")}
        rows = [{s: m[r] for s, m in stats.items()} for r in range(len(CORPORA))]
        return np.stack([self._weight_scores(model, vocab, stat) for stat in rows], axis=-1)

    def _weight_scores(self, model: Any, vocab: np.ndarray, stat: dict[str, torch.Tensor]) -> np.ndarray:
        ids = torch.from_numpy(vocab)

        def sub(m: torch.Tensor) -> torch.Tensor:
            return m.detach().cpu()[ids][:, ids]

        delta = stat["delta"]
        output = cosine(sub(model.output), stat["bigram"])
        out = []
        for layer in model.layers:
            position = layer.position.detach().cpu()
            n = min(position.numel(), delta.numel())
            out.append(
                [
                    output,
                    cosine(sub(layer.value), stat["value"]),
                    cosine(sub(layer.qk), stat["qk"]),
                    cosine(sub(layer.qk), stat["qk"].T),
                    cosine(position[:n], delta[:n]),
                ]
            )
        return np.array(out)


def onehot_training_corpus(job: JobSpec) -> tuple[np.ndarray, int]:
    """The ``topics`` corpus a one-hot job analyses, and its vocabulary size (``corpus_stats.vocab_size``):
    what ``ckpt-analysis train-onehot`` trains the one-hot model on (docs/leading_terms.md)."""
    if job.data.source != "topics" or job.checkpoints.source != "local":
        raise JobSpecError("train-onehot needs data.source = 'topics' and checkpoints.source = 'local'")
    if CorpusStatsAnalysis.name not in job.analyses:
        raise JobSpecError("train-onehot takes the vocabulary size from [analyses.corpus_stats]")
    vocab = CorpusStatsAnalysis.from_spec(job.analyses[CorpusStatsAnalysis.name]).params.vocab_size
    return topics.corpus(job.data.num_examples, job.data.seq_len, vocab, job.data.seed), vocab
