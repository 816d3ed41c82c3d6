"""Sequences per batch: ``compute.batch_size``, or with ``"auto"`` sized to the free device memory
and the analysis's per-sequence footprint (docs/jobs.md, "Batch size")."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from ckpt_analysis.errors import DataError

if TYPE_CHECKING:
    from ckpt_analysis.data import EvalData
    from ckpt_analysis.registry import UnitContext

log = logging.getLogger(__name__)

CPU_BATCH = 32
"""``"auto"`` off CUDA: host memory is not the bound there, and 32 sequences keep the BLAS busy."""
DEVICE_FRACTION = 0.8
"""``"auto"`` on CUDA: the share of the free device memory batches may fill."""
CPU_VECTORS = 4
"""``vectors_per_pass = "auto"`` off CUDA: the measured best on the CPU (docs/benchmarks.md,
"POLCA projections")."""
DIRECTIONAL_SCALE = 4
"""A forward-mode pass holds about 4 streams (primal, tangent, their products) per vector
(docs/jobs.md, "Batch size")."""

Footprint = Literal["forward", "logits", "backward"]
"""What one batch holds at its peak: the decoder stack's activations without the LM head
(``forward``), with the float32 logits and their log-softmax (``logits``), or everything a
backward pass keeps, with the gradients (``backward``)."""


def batch_size(ctx: UnitContext, model: nn.Module, footprint: Footprint, *, scale: float = 1.0) -> int:
    """The unit's sequences per batch: ``compute.batch_size``; with ``"auto"``, :data:`CPU_BATCH`
    off CUDA, and on CUDA as many sequences as fit :data:`DEVICE_FRACTION` of the free memory at
    the measured per-sequence peak of ``footprint`` times ``scale`` (e.g. 2 for a Hessian-vector
    product's double backward).

    The measurement runs ``footprint`` once on the first sequence (full length) and resets CUDA's
    peak-memory statistics, so a unit's ``gpu_peak_mb`` covers what follows it. It depends only on
    the architecture, dtype, sequence length and footprint, so a worker measures each such
    combination once (:data:`_MEASURED`) and later units reuse it.
    """
    chosen = ctx.job.compute.batch_size
    if chosen != "auto":
        return chosen
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_BATCH
    per_sequence = int(scale * _per_sequence(ctx, model, footprint))
    size = fit_batch(
        _free_bytes(device),
        per_sequence,
        len(ctx.eval_data.input_ids),
        length=ctx.eval_data.input_ids.shape[1],
    )
    log.info("compute.batch_size = 'auto': %d sequences per %s batch on %s", size, footprint, device)
    return size


def directional_pass(ctx: UnitContext, model: nn.Module, vectors: int) -> tuple[int, int]:
    """docs/jobs.md, "Batch size": sequences per batch and basis vectors per ``vmap``-batched pass
    of POLCA's forward-mode passes over ``vectors`` directions, each vector ×
    :data:`DIRECTIONAL_SCALE` the ``logits`` footprint. ``vectors_per_pass = "auto"`` is
    :data:`CPU_VECTORS` off CUDA; on CUDA the batch is sized for one vector, then as many vectors
    as fit the rest of :data:`DEVICE_FRACTION` of the free memory at that batch, at most
    ``vectors``."""
    per_pass = ctx.job.compute.vectors_per_pass
    device = next(model.parameters()).device
    if per_pass != "auto":
        return batch_size(ctx, model, "logits", scale=DIRECTIONAL_SCALE * per_pass), per_pass
    if device.type != "cuda":
        return batch_size(ctx, model, "logits", scale=DIRECTIONAL_SCALE * CPU_VECTORS), CPU_VECTORS
    size = batch_size(ctx, model, "logits", scale=DIRECTIONAL_SCALE)
    per_vector = DIRECTIONAL_SCALE * _per_sequence(ctx, model, "logits") * size
    fitted = max(1, min(vectors, int(_free_bytes(device) * DEVICE_FRACTION) // max(per_vector, 1)))
    log.info("compute.vectors_per_pass = 'auto': %d vectors per pass on %s", fitted, device)
    return size, fitted


def _per_sequence(ctx: UnitContext, model: nn.Module, footprint: Footprint) -> int:
    """The measured per-sequence peak of ``footprint``, measured once per worker (:data:`_MEASURED`)."""
    key = (_architecture(model), ctx.eval_data.input_ids.shape[1], footprint)
    if key not in _MEASURED:
        _MEASURED[key] = _peak_bytes(model, ctx.eval_data, footprint)
    return _MEASURED[key]


def _free_bytes(device: torch.device) -> int:
    """The card's free memory plus what torch holds cached but unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


_MEASURED: dict[tuple[str, int, Footprint], int] = {}
"""Per-sequence peak bytes by (architecture and dtype, sequence length, footprint), for the life of
the worker process."""


def _architecture(model: nn.Module) -> str:
    """What the per-sequence peak depends on besides the data: the model's config and dtype."""
    config = getattr(model, "config", None)
    described = config.to_json_string() if config is not None else type(model).__name__
    return f"{described}|{next(model.parameters()).dtype}"


def fit_batch(free_bytes: int, per_sequence_bytes: int, sequences: int, *, length: int) -> int:
    """docs/jobs.md, "Batch size": ⌊:data:`DEVICE_FRACTION` · free / per-sequence⌋ sequences, at
    most all of them; refused with the way out when not even one sequence of ``length`` fits."""
    usable = int(free_bytes * DEVICE_FRACTION)
    if per_sequence_bytes > usable:
        raise DataError(
            f"compute.batch_size = 'auto': one sequence of {length} tokens needs "
            f"{per_sequence_bytes / 1e9:.3g} GB on the device, but {usable / 1e9:.3g} GB "
            f"({DEVICE_FRACTION:.0%} of the {free_bytes / 1e9:.3g} GB free) is usable; shorten "
            "data.seq_len, analyse in a smaller checkpoints.dtype, or free the device"
        )
    return max(1, min(sequences, usable // max(per_sequence_bytes, 1)))


def _peak_bytes(model: nn.Module, data: EvalData, footprint: Footprint) -> int:
    """Device memory one sequence of ``data`` takes at the peak of ``footprint``, above what was
    allocated before (the model's weights)."""
    ids, attention, _ = next(data.batches(1, next(model.parameters()).device))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    if footprint == "backward":
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits
            logits.float().log_softmax(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode():
            if footprint == "forward":
                cast(nn.Module, model.base_model)(input_ids=ids, attention_mask=attention)
            else:
                model(input_ids=ids, attention_mask=attention).logits.float().log_softmax(-1)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)
