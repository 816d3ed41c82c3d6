"""Evaluation token sets (docs/jobs.md): fixed-length sequences, a scored-target mask and label columns."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckpt_analysis.config import DataSpec, hf_cache_dir
from ckpt_analysis.device import to_device
from ckpt_analysis.errors import DataError, one_line
from ckpt_analysis.tasks import arithmetic, grammar, topics
from ckpt_analysis.types import Batch

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

_FILE_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
    ".csv": "csv",
}


@dataclass
class EvalData:
    """The analysed token set.

    ``input_ids``/``attention_mask``/``score_mask`` are ``(sequence, position)``. Convention
    (docs/jobs.md): ``score_mask[s, t]`` and every label describe token t, the *target*, predicted by
    the logits at position t − 1, so position 0 is never scored. Labels are −1 where absent.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    score_mask: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.score_mask = self.score_mask & (self.attention_mask > 0)
        self.score_mask[:, 0] = False
        if not self.score_mask.any():
            raise DataError("the evaluation data has no scored tokens (all sequences too short?)")

    @property
    def token_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequence, position) of every analysed (scored) token, in row-major order."""
        seq, pos = np.nonzero(self.score_mask)
        return seq.astype(np.int64), pos.astype(np.int64)

    def batches(self, size: int, device: torch.device | str = "cpu") -> Iterator[Batch]:
        """``(input_ids, attention_mask, score_mask)`` tensors, ``size`` sequences at a time."""
        for part in self.slices(size):
            yield Batch(
                *(to_device(a[part], device) for a in (self.input_ids, self.attention_mask, self.score_mask))
            )

    def slices(self, size: int) -> Iterator[slice]:
        """The sequences of each of :meth:`batches`' batches, to index host arrays beside them."""
        for start in range(0, self.input_ids.shape[0], size):
            yield slice(start, start + size)

    def head(self, sequences: int) -> EvalData:
        """The first ``sequences`` sequences (e.g. a Hessian sample)."""
        part = slice(0, sequences)
        labels = {k: v[part] for k, v in self.labels.items()}
        return EvalData(self.input_ids[part], self.attention_mask[part], self.score_mask[part].copy(), labels)

    @property
    def num_tokens(self) -> int:
        return int(self.score_mask.sum())

    def token_labels(self) -> dict[str, np.ndarray]:
        seq, pos = self.token_index
        return {name: values[seq, pos] for name, values in self.labels.items()}

    def token_strings(self, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[str]]:
        """Decoded text of each analysed token and of its preceding context."""
        seq, pos = self.token_index
        texts: list[str] = []
        contexts: list[str] = []
        for s, p in zip(seq.tolist(), pos.tolist(), strict=True):
            texts.append(str(tokenizer.decode([int(self.input_ids[s, p])])))
            contexts.append(str(tokenizer.decode([int(i) for i in self.input_ids[s, :p]])))
        return texts, contexts


def label_names(spec: DataSpec) -> list[str]:
    """The per-token label columns a token set has: ``place`` and ``carry``/``borrow`` for the
    arithmetic tasks, ``pos`` and ``role`` for the grammar, ``data.label_columns`` for a dataset,
    none for ``topics``."""
    if spec.source == "addition" or spec.source == "subtraction":
        return ["place", arithmetic.LABEL[spec.source]]
    if spec.source == "grammar":
        return ["pos", "role"]
    return list(spec.label_columns) if spec.source == "dataset" else []


def level_names(source: str) -> dict[str, tuple[str, ...]]:
    """Names of a built-in task's label values, where they have names (value = index into them)."""
    return {"pos": grammar.POS, "role": grammar.ROLES} if source == "grammar" else {}


def vocabulary_labels(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int
) -> dict[str, np.ndarray]:
    """Label columns a built-in task defines for every vocabulary id, ``(vocab_size,)`` with −1 for
    an id outside it: the grammar's ``pos``, from its lexicon. Other labels depend on context."""
    if spec.source != "grammar" or tokenizer is None:
        return {}
    pos = np.full(vocab_size, -1, dtype=np.int64)
    for word, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            pos[i] = grammar.word_pos(word)
    return {"pos": pos}


def label_variable(column: str) -> str:
    """The store variable of a label column: ``label_<column>``, or the column's own name when it
    already starts with ``label`` (a column ``label`` is stored as ``label``, not ``label_label``)."""
    return column if column.startswith("label") else f"label_{column}"


def load_eval_data(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase | None, *, max_positions: int | None, vocab_size: int
) -> EvalData:
    """Build the token set named by ``spec``, checking it fits the model's context and vocabulary.

    ``tokenizer`` may be None only where ``spec.needs_tokenizer`` is false (pre-tokenized ids).
    """
    if spec.source == "topics":
        data = _topics(spec, vocab_size)
    elif spec.source == "dataset":
        data = _from_dataset(spec, tokenizer)
    elif tokenizer is None:
        raise DataError(f"data.source = {spec.source!r} needs the checkpoints' tokenizer")
    elif spec.source == "grammar":
        data = _grammar(spec, tokenizer)
    else:
        data = _arithmetic(spec, spec.source, tokenizer)
    length = data.input_ids.shape[1]
    if max_positions is not None and length > max_positions:
        raise DataError(
            f"sequences of {length} tokens exceed the model context of {max_positions} positions; "
            f"set data.seq_len (now {spec.seq_len}) to at most {max_positions}"
            if spec.source not in arithmetic.OPERATIONS
            else f"{spec.source} problems of {length} tokens exceed the model context of {max_positions}"
        )
    if data.input_ids.max() >= vocab_size or data.input_ids.min() < 0:
        raise DataError(f"token ids fall outside the model vocabulary of {vocab_size}")
    return data


def _arithmetic(
    spec: DataSpec, operation: arithmetic.Operation, tokenizer: PreTrainedTokenizerBase
) -> EvalData:
    a, b = arithmetic.problems(spec.num_examples, spec.seed, operation)
    try:
        ids = arithmetic.encode(tokenizer, a, b, operation)  # type: ignore[arg-type]
    except ValueError as exc:
        raise DataError(f"data.source = {operation!r} needs the arithmetic tokenizer: {exc}") from exc
    labels = arithmetic.labels(a, b, operation)
    return EvalData(ids, np.ones_like(ids, dtype=np.int8), arithmetic.score_mask(len(a)), labels)


def _grammar(spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> EvalData:
    """``num_examples`` sequences of ``seq_len`` words of the checkpoint's own grammar (read from its
    tokenizer), every position after ``<bos>`` scored, with ``pos`` and ``role`` labels."""
    try:
        lexicon = grammar.Grammar.from_tokenizer(tokenizer)
        words, pos, role = grammar.corpus(lexicon, spec.num_examples, spec.seq_len, spec.seed)
        ids = grammar.encode(tokenizer, words)
    except ValueError as exc:
        raise DataError(f"data.source = 'grammar' needs the grammar tokenizer: {exc}") from exc
    ones = np.ones_like(ids, dtype=np.int8)
    return EvalData(ids, ones, ones.astype(bool), {"pos": pos, "role": role})


def _topics(spec: DataSpec, vocab_size: int) -> EvalData:
    """``num_examples`` sequences of ``seq_len`` tokens of the synthetic topic corpus, all scored."""
    ids = topics.corpus(spec.num_examples, spec.seq_len, vocab_size, spec.seed)
    ones = np.ones_like(ids, dtype=np.int8)
    return EvalData(ids, ones, ones.astype(bool))


def hub_dataset_name(spec: DataSpec) -> str | None:
    """The Hub dataset that ``data.path`` names: a dataset source whose path is no file or folder."""
    if spec.source != "dataset" or spec.path is None or Path(spec.path).expanduser().exists():
        return None
    return spec.path


def datasets_cache(spec: DataSpec) -> Path:
    """Where Hub datasets are cached: ``data.cache_dir``, else ``HF_DATASETS_CACHE``, else
    ``HF_HOME/datasets`` (``~/.cache/huggingface/datasets``), as ``datasets`` resolves it."""
    return hf_cache_dir(spec.cache_dir, env_var="HF_DATASETS_CACHE", subfolder="datasets")


def hub_dataset_cached(spec: DataSpec) -> bool:
    """Whether the Hub dataset of ``spec`` has a prepared copy in :func:`datasets_cache`, looked up
    without importing ``datasets`` (which reads ``HF_HUB_OFFLINE`` once, at import). The cache
    folder is ``<owner>___<name>``; a name with capitals is snake-cased there and is not found
    by this check (the run then stays online, and ``datasets`` falls back to its cache)."""
    name = hub_dataset_name(spec)
    if name is None:
        return False
    return any((datasets_cache(spec) / name.replace("/", "___")).glob("*/*/*/dataset_info.json"))


def load_hub_dataset(spec: DataSpec) -> Any:
    """``datasets.load_dataset`` of the Hub dataset ``data.path`` (``data.subset``), into or from
    :func:`datasets_cache`: online it downloads and prepares what is not there; with
    ``HF_HUB_OFFLINE=1`` it reads the prepared copy. Returns a ``DatasetDict`` (or ``Dataset``)."""
    import datasets

    name = hub_dataset_name(spec)
    if name is None:
        raise DataError(f"data.path {spec.path!r} is a file or folder, not a Hub dataset name")
    try:
        return datasets.load_dataset(name, spec.subset, cache_dir=str(datasets_cache(spec)))
    except Exception as exc:
        subset = f" (subset {spec.subset!r})" if spec.subset else ""
        raise DataError(
            f"data.path {name!r}{subset} is neither a file nor a folder (relative paths resolve against "
            f"the job file's folder) nor a Hub dataset loadable from the datasets cache "
            f"{datasets_cache(spec)}: {one_line(exc)}. Cache it with `ckpt-analysis prefetch JOB` "
            "online; pick one of several subsets with data.subset"
        ) from exc


def _load_dataset(spec: DataSpec) -> Dataset:
    import datasets

    if spec.path is None:
        raise DataError("data.path is required when data.source = 'dataset'")
    if spec.subset is not None and hub_dataset_name(spec) is None:
        raise DataError(f"data.subset picks a subset of a Hub dataset; data.path {spec.path} is a local path")
    path = Path(spec.path)
    fmt: str = spec.format
    if fmt == "auto":
        fmt = "disk" if path.is_dir() else _FILE_FORMATS.get(path.suffix, "")
        if not fmt and path.exists():
            raise DataError(f"cannot tell the format of {path}; set data.format")
    if path.is_file() and not _has_content(path):
        raise DataError(f"the data file {path} is empty")
    try:
        if not path.exists():
            loaded: Any = load_hub_dataset(spec)
        elif fmt == "disk":
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset("json" if fmt == "jsonl" else fmt, data_files=str(path))
    except DataError:
        raise
    except IndexError as exc:  # load_from_disk of a dataset saved with no rows has no shard to open
        raise DataError(f"the dataset at {spec.path} is empty") from exc
    except Exception as exc:
        raise DataError(f"could not load data from {spec.path}: {one_line(exc)}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = spec.split or next(iter(loaded))
        if split not in loaded:
            raise DataError(f"split {split!r} not in {spec.path}; available: {', '.join(loaded)}")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise DataError(f"the dataset at {spec.path} is empty")
    if spec.num_sequences is not None and spec.num_sequences > len(loaded):
        raise DataError(
            f"data.num_sequences = {spec.num_sequences} but {spec.path} has only {len(loaded)} sequences; "
            "lower it, or leave it out to use them all"
        )
    if spec.num_sequences is not None:
        loaded = loaded.select(range(spec.num_sequences))
    return loaded


def _has_content(path: Path) -> bool:
    with path.open("rb") as handle:
        return bool(handle.read(4096).strip())


def _from_dataset(spec: DataSpec, tokenizer: PreTrainedTokenizerBase | None) -> EvalData:
    ds = _load_dataset(spec)
    needed = [spec.ids_column or spec.text_column, *spec.label_columns]
    needed += [spec.score_mask_column] if spec.score_mask_column else []
    absent = [c for c in needed if c not in ds.column_names]
    if absent:
        raise DataError(f"column(s) {absent} not in {spec.path}; available: {', '.join(ds.column_names)}")
    if spec.ids_column is None and (spec.label_columns or spec.score_mask_column):
        raise DataError("per-token labels and score masks need pre-tokenized ids (data.ids_column)")
    if spec.ids_column:
        rows = [list(map(int, r)) for r in ds[spec.ids_column]]
    else:
        assert tokenizer is not None  # DataSpec.needs_tokenizer
        rows = tokenizer(list(ds[spec.text_column]), add_special_tokens=False)["input_ids"]
    if spec.add_bos:
        assert tokenizer is not None
        if tokenizer.bos_token_id is None:
            raise DataError("data.add_bos = true but the tokenizer has no BOS token")
        rows = [[tokenizer.bos_token_id, *r] for r in rows]
    ids, attn = _pad(rows, _width(rows, spec, tokenizer), _pad_id(spec, tokenizer))
    score = _pad_column(ds, spec.score_mask_column, spec.seq_len, 1).astype(bool)
    labels = {c: _pad_column(ds, c, spec.seq_len, -1) for c in spec.label_columns}
    return EvalData(ids, attn, score, labels)


def _width(rows: list[list[int]], spec: DataSpec, tokenizer: PreTrainedTokenizerBase | None) -> int:
    """``seq_len``, or, with nothing to pad with (no ``data.pad_id``, no tokenizer), the common
    length of rows that need no padding; unequal rows then are one error naming both ways out."""
    if spec.pad_id is not None or tokenizer is not None:
        return spec.seq_len
    lengths = {min(len(r), spec.seq_len) for r in rows}
    if len(lengths) > 1:
        raise DataError(
            f"the sequences of {spec.path} have {min(lengths)} to {max(lengths)} tokens and there is no "
            "tokenizer to pad them with: set data.pad_id, or give every sequence at least data.seq_len "
            f"(now {spec.seq_len}) tokens"
        )
    return lengths.pop()


def _pad_id(spec: DataSpec, tokenizer: PreTrainedTokenizerBase | None) -> int:
    """The padding id (masked out, but stored in ``input_ids``): ``data.pad_id``, else the
    tokenizer's pad token, else its EOS, else 0."""
    if spec.pad_id is not None or tokenizer is None:
        return spec.pad_id or 0
    special = set(tokenizer.all_special_ids)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and candidate in special:
            return int(candidate)
    return 0


def _pad(rows: list[list[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncate or right-pad each row to ``length``; the mask marks real tokens."""
    ids = np.full((len(rows), length), pad, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int8)
    for i, row in enumerate(rows):
        row = row[:length]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _pad_column(ds: Dataset, column: str | None, length: int, default: int) -> np.ndarray:
    """A per-token column (lists, truncated/padded) or per-sequence scalars broadcast over tokens."""
    if column is None:
        return np.full((len(ds), length), default, dtype=np.int64)
    out = np.full((len(ds), length), default, dtype=np.int64)
    for i, value in enumerate(ds[column]):
        if isinstance(value, list):
            value = value[:length]
            out[i, : len(value)] = value
        else:
            out[i, :] = int(value)
    return out
