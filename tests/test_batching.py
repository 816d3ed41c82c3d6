"""Batch sizes: an explicit compute.batch_size, "auto" on the CPU, and the device-memory fit."""

import pytest
import torch
from builders import random_eval_data, tiny_model, unit_context

from ckpt_analysis.batching import CPU_BATCH, DEVICE_FRACTION, Footprint, batch_size, fit_batch
from ckpt_analysis.config import ComputeSpec
from ckpt_analysis.errors import DataError, JobSpecError

GB = 10**9


def test_auto_is_the_default_and_gives_the_cpu_batch_off_cuda() -> None:
    model = tiny_model(0)
    data = random_eval_data(int(model.config.vocab_size), 40, 12)
    assert ComputeSpec().batch_size == "auto"
    assert batch_size(unit_context(model, data, {}, batch_size="auto"), model, "forward") == CPU_BATCH
    assert batch_size(unit_context(model, data, {}, batch_size=5), model, "backward", scale=2) == 5


@pytest.mark.parametrize(
    ("free", "per_sequence", "sequences", "expected"),
    [(10 * GB, GB, 100, 8), (10 * GB, GB, 3, 3), (10 * GB, 8 * GB, 100, 1), (100 * GB, 1, 7, 7)],
)
def test_fit_batch_fills_the_usable_share_of_free_memory_and_no_more_than_every_sequence(
    free: int, per_sequence: int, sequences: int, expected: int
) -> None:
    assert fit_batch(free, per_sequence, sequences, length=128) == expected
    assert expected == sequences or (expected + 1) * per_sequence > DEVICE_FRACTION * free


def test_a_sequence_too_large_for_the_device_is_refused_with_the_way_out() -> None:
    with pytest.raises(
        DataError, match=r"one sequence of 2048 tokens needs 9 GB .* 8 GB \(80% of the 10 GB free"
    ):
        fit_batch(10 * GB, 9 * GB, 4, length=2048)
    with pytest.raises(DataError, match=r"shorten data.seq_len, analyse in a smaller checkpoints.dtype"):
        fit_batch(10 * GB, 9 * GB, 4, length=2048)


def test_batch_size_takes_auto_or_a_positive_count() -> None:
    with pytest.raises(JobSpecError, match=r"compute.batch_size = 0 must be at least 1"):
        ComputeSpec(batch_size=0)
    from ckpt_analysis.config import parse_dataclass

    with pytest.raises(JobSpecError, match=r"compute.batch_size = 'big' is not valid; choose one of: 'auto'"):
        parse_dataclass(ComputeSpec, {"batch_size": "big"}, "compute")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("footprint", ["forward", "logits", "backward"])
def test_auto_on_cuda_fits_the_free_memory_at_the_measured_per_sequence_peak(footprint: Footprint) -> None:
    model = tiny_model(0)
    torch.nn.Module.to(model, "cuda")  # transformers mis-types .cuda
    data = random_eval_data(int(model.config.vocab_size), 4000, 32)
    size = batch_size(unit_context(model, data, {}, batch_size="auto"), model, footprint)
    free, _ = torch.cuda.mem_get_info()
    assert 1 <= size <= 4000
    ids = torch.from_numpy(data.input_ids[:size]).cuda()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model(input_ids=ids).logits.float().log_softmax(-1)
    assert torch.cuda.max_memory_allocated() - before < free
