"""Checks that a job's checkpoints compute one function family: equal configs and parameter
layouts read from weight-file headers, and the config keys the analyses read by standard names."""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_analysis.checkpoints.base import Checkpoint, CheckpointSource, read_state_dict
from ckpt_analysis.errors import CheckpointError, one_line


def read_layout(files: list[Path], revision: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes from weight-file headers, without reading the weights."""
    from safetensors import safe_open

    layout: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                        layout[key] = tuple(handle.get_slice(key).get_shape())
            else:
                layout.update({k: tuple(v.shape) for k, v in read_state_dict(path).items()})
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {revision}: weights file {path.name} is corrupt or unreadable: {one_line(exc)}"
            ) from exc
    return layout


BOOKKEEPING_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "architectures",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_dropout",
        "hidden_dropout",
        "classifier_dropout",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
"""Config fields that never change what a checkpoint computes in eval mode; every other field must
agree across a job's checkpoints (docs/jobs.md, "What is checked before anything runs")."""


def check_layout(source: CheckpointSource[Any], ckpts: list[Checkpoint]) -> dict[str, Any]:
    """Check every checkpoint computes the same function family: equal configs and parameter layouts.

    Every config field outside :data:`BOOKKEEPING_KEYS` is compared, and every parameter name and
    shape. The checkpoint that differs from the majority is blamed, beside one that agrees.
    Returns the majority config.
    """
    if not ckpts:
        raise CheckpointError("the checkpoint selection is empty")
    configs = [source.config(c) for c in ckpts]
    keys = sorted({k for c in configs for k in c} - BOOKKEEPING_KEYS)
    for key in keys:
        values = [json.dumps(c.get(key), sort_keys=True) for c in configs]
        _blame_minority(ckpts, values, functools.partial(_config_value, key, values))
    layouts = [read_layout(source.weight_files(c), c.revision) for c in ckpts]
    source.check_keys(ckpts[0], layouts[0])
    signatures = [json.dumps(sorted(x.items())) for x in layouts]
    usual = layouts[_majority_index(signatures)]
    _blame_minority(ckpts, signatures, functools.partial(_layout_entry, layouts, usual))
    return standard_names(
        configs[_majority_index([json.dumps(c, sort_keys=True, default=str) for c in configs])]
    )


STANDARD_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)
"""Config fields the analyses read by these names, whatever a model family calls them."""


def standard_names(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` plus :data:`STANDARD_KEYS` under the names transformers maps a family's own
    to (GPT-2's ``n_layer``, ``n_embd``, ``n_head``, ``n_positions``), where the file lacks them."""
    from transformers import AutoConfig

    try:
        parsed = AutoConfig.for_model(**config)
    except (KeyError, ValueError, TypeError):  # no or an unknown model_type: the file as it is
        return config
    found = {k: getattr(parsed, k, None) for k in STANDARD_KEYS if k not in config}
    return {**config, **{k: v for k, v in found.items() if v is not None}}


def _config_value(key: str, values: list[str], i: int, minority: int) -> str:
    return f"{key} = {values[i]}"


def _layout_entry(
    layouts: list[dict[str, tuple[int, ...]]], usual: dict[str, tuple[int, ...]], i: int, minority: int
) -> str:
    name = sorted(set(layouts[minority].items()) ^ set(usual.items()))[0][0]
    return f"parameter {name!r} with shape {layouts[i].get(name, 'absent')}"


def _majority_index(values: list[str]) -> int:
    common = collections.Counter(values).most_common(1)[0][0]
    return values.index(common)


def _blame_minority(ckpts: list[Checkpoint], values: list[str], describe: Callable[[int, int], str]) -> None:
    """Raise naming the first checkpoint whose value differs from the majority's, and one that agrees.

    ``describe(i, minority)`` says what checkpoint ``i`` has where ``minority`` differs.
    """
    agree = _majority_index(values)
    for i, value in enumerate(values):
        if value != values[agree]:
            raise CheckpointError(
                f"architecture mismatch: checkpoint {ckpts[i].revision} has {describe(i, i)}, "
                f"where {ckpts[agree].revision} and the majority have {describe(agree, i)}"
            )
