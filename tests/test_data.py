"""Evaluation data: the arithmetic tasks' labels, dataset sources, masks, and their errors."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckpt_analysis.config import DataSpec
from ckpt_analysis.data import EvalData, hub_dataset_cached, load_eval_data
from ckpt_analysis.errors import DataError
from ckpt_analysis.tasks import arithmetic


@pytest.fixture
def tokenizer():  # type: ignore[no-untyped-def]
    return arithmetic.build_tokenizer()


def test_addition_carry_labels_match_column_arithmetic() -> None:
    a, b = arithmetic.problems(500, seed=7)
    labels = arithmetic.labels(a, b)
    for i in range(len(a)):
        x, y, carry = int(a[i]), int(b[i]), 0
        expected = []
        for place in range(4):  # ones … thousands, carrying by hand
            expected.append(carry)
            carry = int((x // 10**place % 10) + (y // 10**place % 10) + carry >= 10)
        got = [labels["carry"][i, pos] for pos in reversed(arithmetic.ANSWER_POSITIONS)]
        assert got == expected, (x, y)
    assert (labels["place"][:, list(arithmetic.ANSWER_POSITIONS)] == [3, 2, 1, 0]).all()
    assert (labels["carry"][:, :9] == -1).all()


def test_subtraction_borrow_labels_match_column_arithmetic() -> None:
    a, b = arithmetic.problems(500, seed=8, operation="subtraction")
    assert (a >= b).all()
    labels = arithmetic.labels(a, b, "subtraction")
    answers = arithmetic.texts(a, b, "subtraction")
    for i in range(len(a)):
        x, y, borrow = int(a[i]), int(b[i]), 0
        expected, digits = [], []
        for place in range(4):  # ones … thousands, borrowing by hand
            expected.append(borrow)
            digit = (x // 10**place % 10) - (y // 10**place % 10) - borrow
            borrow = int(digit < 0)
            digits.append(digit % 10)
        got = [labels["borrow"][i, pos] for pos in reversed(arithmetic.ANSWER_POSITIONS)]
        assert got == expected, (x, y)
        assert answers[i].endswith("=" + "".join(map(str, reversed(digits))) + "<eos>")
    assert "carry" not in labels
    assert labels["borrow"][:, 9].max() == 0  # a ≥ b: the thousands digit never borrows


def test_subtraction_needs_a_tokenizer_that_spells_minus() -> None:
    from transformers import PreTrainedTokenizerFast

    old = arithmetic.build_tokenizer()
    vocab = {t: i for t, i in old.get_vocab().items() if t != "-"}
    from tokenizers import Tokenizer, models

    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = old.backend_tokenizer.pre_tokenizer
    plus_only = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>")
    spec = DataSpec(source="subtraction", num_examples=4)
    with pytest.raises(DataError, match=r"subtraction.*lacks '-'"):
        load_eval_data(spec, plus_only, max_positions=32, vocab_size=len(vocab))
    spec = DataSpec(source="addition", num_examples=4)
    added = load_eval_data(spec, plus_only, max_positions=32, vocab_size=16)
    assert added.input_ids.shape == (4, arithmetic.SEQ_LEN)


def test_asking_for_more_sequences_than_the_data_holds_names_both_counts(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["1+1=2", "2+2=4", "3+3=6"]) + "\n")
    spec = DataSpec(source="dataset", path=str(path), num_sequences=5)
    with pytest.raises(DataError, match=r"num_sequences = 5 but .* has only 3 sequences"):
        load_eval_data(spec, tokenizer, max_positions=32, vocab_size=len(arithmetic.VOCAB))
    spec = DataSpec(source="dataset", path=str(path), num_sequences=2, seq_len=6)
    assert load_eval_data(spec, tokenizer, max_positions=32, vocab_size=16).input_ids.shape[0] == 2


def test_addition_scores_only_answer_digits(tokenizer) -> None:  # type: ignore[no-untyped-def]
    data = load_eval_data(
        DataSpec(source="addition", num_examples=10),
        tokenizer,
        max_positions=32,
        vocab_size=len(arithmetic.VOCAB),
    )
    _, pos = data.token_index
    assert data.num_tokens == 40
    assert set(pos.tolist()) == set(arithmetic.ANSWER_POSITIONS)
    texts, contexts = data.token_strings(tokenizer)
    assert contexts[0].startswith("<bos>") and contexts[0].endswith("=")
    assert all(t.isdigit() for t in texts)


def test_text_file_is_tokenized_truncated_and_padded(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["12+34=46", "1+1=2", "999+999=1998"]))
    data = load_eval_data(
        DataSpec(source="dataset", path=str(path), seq_len=8),
        tokenizer,
        max_positions=32,
        vocab_size=len(arithmetic.VOCAB),
    )
    assert data.input_ids.shape == (3, 8)
    assert data.attention_mask.sum(axis=1).tolist() == [8, 5, 8]
    assert not data.score_mask[:, 0].any()
    assert not data.score_mask[1, 5:].any()  # padding is never scored
    assert tokenizer.decode(data.input_ids[0]) == "12+34=46"


def test_pretokenized_ids_carry_masks_and_labels(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "ids": [[1, 3, 4, 5], [1, 6, 7]],
            "mask": [[0, 0, 1, 1], [0, 1, 1]],
            "kind": [[9, 8, 7, 6], [5, 4, 3]],
            "doc": [10, 20],
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    spec = DataSpec(
        source="dataset",
        path=str(tmp_path / "ds"),
        ids_column="ids",
        score_mask_column="mask",
        label_columns=["kind", "doc"],
        seq_len=4,
    )
    data = load_eval_data(spec, tokenizer, max_positions=32, vocab_size=len(arithmetic.VOCAB))
    assert data.token_index[1].tolist() == [2, 3, 1, 2]
    labels = data.token_labels()
    assert labels["kind"].tolist() == [7, 6, 4, 3]
    assert labels["doc"].tolist() == [10, 10, 20, 20]


@pytest.mark.parametrize(
    ("rows", "match"),
    [([], "is empty"), (["1"], "no scored tokens")],
)
def test_empty_or_too_short_data_is_rejected(tmp_path: Path, tokenizer, rows, match) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in rows) + ("\n" if rows else ""))
    with pytest.raises(DataError, match=match):
        load_eval_data(
            DataSpec(source="dataset", path=str(path), format="jsonl"),
            tokenizer,
            max_positions=32,
            vocab_size=16,
        )


def test_sequence_longer_than_context_is_rejected(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="of 14 tokens exceed the model context of 8"):
        load_eval_data(DataSpec(source="addition", num_examples=4), tokenizer, max_positions=8, vocab_size=16)


def test_missing_column_lists_the_available_ones(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "1+1=2"}) + "\n")
    with pytest.raises(DataError, match=r"column\(s\) \['text'\] not in .*available: body"):
        load_eval_data(DataSpec(source="dataset", path=str(path)), tokenizer, max_positions=32, vocab_size=16)


def test_score_mask_excludes_position_zero_and_padding() -> None:
    data = EvalData(
        np.ones((1, 4), dtype=np.int64), np.array([[1, 1, 1, 0]], dtype=np.int8), np.ones((1, 4), dtype=bool)
    )
    assert data.score_mask.tolist() == [[False, True, True, False]]


def test_text_longer_than_the_context_names_data_seq_len(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "1+1=2"}) + "\n")
    with pytest.raises(DataError, match=r"set data\.seq_len \(now 128\) to at most 16"):
        load_eval_data(DataSpec(source="dataset", path=str(path)), tokenizer, max_positions=16, vocab_size=16)


def test_an_empty_saved_dataset_is_named_empty(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import datasets

    datasets.Dataset.from_dict({"input_ids": []}).save_to_disk(str(tmp_path / "empty"))
    spec = DataSpec(source="dataset", path=str(tmp_path / "empty"), ids_column="input_ids")
    with pytest.raises(DataError, match="is empty"):
        load_eval_data(spec, tokenizer, max_positions=32, vocab_size=16)


def test_a_missing_relative_data_path_says_where_it_was_looked_for(tmp_path: Path) -> None:
    from builders import write_job

    from ckpt_analysis.config import load_job

    job = load_job(
        write_job(
            tmp_path / "j.toml", tmp_path, Path("o.zarr"), data={"source": "dataset", "path": "nope_data"}
        )
    )
    with pytest.raises(
        DataError, match=r"data\.path 'nope_data' is neither a file nor a folder .*job file's folder"
    ):
        load_eval_data(job.data, None, max_positions=32, vocab_size=16)


SUMS = {"easy": ["1+1=2", "12+34=46"], "hard": ["999+999=1998", "123+877=1000", "5+5=10"]}


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builders import build_hub_dataset

    return build_hub_dataset(tmp_path_factory.mktemp("datasets"), "acme/sums", SUMS)


def _hub_spec(cache: Path, **overrides: object) -> DataSpec:
    fields: dict[str, Any] = {
        "source": "dataset",
        "path": "acme/sums",
        "cache_dir": str(cache),
        "seq_len": 16,
    }
    return DataSpec(**{**fields, **overrides})


@pytest.mark.parametrize("subset", ["easy", "hard"])
def test_a_cached_hub_dataset_loads_offline_by_name_and_is_tokenized_by_the_checkpoint_tokenizer(
    datasets_cache: Path, tokenizer: Any, subset: str
) -> None:
    data = load_eval_data(
        _hub_spec(datasets_cache, subset=subset),
        tokenizer,
        max_positions=32,
        vocab_size=len(arithmetic.VOCAB),
    )
    expected = tokenizer(SUMS[subset], add_special_tokens=False)["input_ids"]
    assert data.input_ids.shape == (len(SUMS[subset]), 16)
    for row, ids, mask in zip(expected, data.input_ids, data.attention_mask, strict=True):
        assert ids[: len(row)].tolist() == row and mask.sum() == len(row)


def test_a_hub_dataset_with_several_cached_subsets_asks_for_data_subset(
    datasets_cache: Path, tokenizer: Any
) -> None:
    with pytest.raises(DataError, match=r"'acme/sums' .*multiple .*configurations.*easy, hard.*data\.subset"):
        load_eval_data(_hub_spec(datasets_cache), tokenizer, max_positions=32, vocab_size=16)


def test_a_hub_dataset_missing_from_the_cache_says_to_prefetch_it(
    datasets_cache: Path, tokenizer: Any
) -> None:
    spec = _hub_spec(datasets_cache, path="acme/absent")
    with pytest.raises(DataError, match=rf"'acme/absent' .*datasets cache {datasets_cache}.*prefetch"):
        load_eval_data(spec, tokenizer, max_positions=32, vocab_size=16)


def test_data_subset_with_a_local_file_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "1+1=2"}))
    spec = DataSpec(source="dataset", path=str(tmp_path / "d.jsonl"), subset="easy")
    with pytest.raises(DataError, match=r"data\.subset picks a subset of a Hub dataset"):
        load_eval_data(spec, tokenizer, max_positions=32, vocab_size=16)


def test_hub_dataset_cached_finds_the_prepared_copy_only(datasets_cache: Path, tmp_path: Path) -> None:
    assert hub_dataset_cached(_hub_spec(datasets_cache))
    assert not hub_dataset_cached(_hub_spec(datasets_cache, path="acme/absent"))
    assert not hub_dataset_cached(_hub_spec(tmp_path))
    (tmp_path / "d.jsonl").write_text("{}")
    assert not hub_dataset_cached(_hub_spec(datasets_cache, path=str(tmp_path / "d.jsonl")))
