"""The annotated grammar corpus: determinism, labels against an independent parse, its tokenizer,
its data source and its trainer."""

from pathlib import Path

import numpy as np
import pytest
from builders import build_grammar_run

from ckpt_analysis.config import DataSpec
from ckpt_analysis.data import load_eval_data
from ckpt_analysis.errors import DataError
from ckpt_analysis.tasks import arithmetic, grammar
from ckpt_analysis.zoo.train import save_steps


def _parse(words: list[str]) -> list[tuple[str | None, str | None]]:
    """(POS, role) of each word by reading the sentence left to right, as a reader of the grammar
    would: nouns before the verb are agents, after it patients, after a preposition locations."""
    out: list[tuple[str | None, str | None]] = []
    seen_verb = seen_prep = False
    for word in words:
        if word == "<bos>":
            out.append((None, None))
        elif word == ".":
            out.append(("punct", "function"))
            seen_verb = seen_prep = False
        elif word in grammar.DETERMINERS:
            out.append(("det", "function"))
        elif word in grammar.PREPOSITIONS:
            out.append(("prep", "function"))
            seen_prep = True
        elif word.startswith("adj"):
            out.append(("adj", "attribute"))
        elif word.startswith(("vt", "vi")):
            out.append(("verb", "action"))
            seen_verb = True
        else:
            out.append(("noun", "location" if seen_prep else "patient" if seen_verb else "agent"))
    return out


def test_the_generator_is_deterministic_for_a_seed() -> None:
    lexicon = grammar.Grammar.of_size(200)
    first, second, other = (grammar.corpus(lexicon, 20, 24, seed) for seed in (3, 3, 4))
    assert first[0] == second[0] and (first[1] == second[1]).all() and (first[2] == second[2]).all()
    assert first[0] != other[0]


def test_labels_match_the_grammars_own_parse_and_its_selection_rules() -> None:
    lexicon = grammar.Grammar.of_size(120)
    words, pos, role = grammar.corpus(lexicon, 50, 40, seed=0)
    for row, p, r in zip(words, pos, role, strict=True):
        for (want_pos, want_role), got_pos, got_role in zip(_parse(row), p, r, strict=True):
            assert (grammar.POS[got_pos] if got_pos >= 0 else None) == want_pos
            assert (grammar.ROLES[got_role] if got_role >= 0 else None) == want_role
        for i, word in enumerate(row):  # agents animate, locations places, patients as the verb selects
            if role_name := (grammar.ROLES[r[i]] if r[i] >= 0 else None):
                verb = next((w for w in reversed(row[:i]) if w.startswith("vt")), "vt0001")
                expected = {
                    "agent": "anim",
                    "location": "place",
                    "patient": "obj" if int(verb[2:]) % 2 == 0 else "anim",
                }.get(role_name)
                assert expected is None or word.startswith(expected), (row, i)


def test_noise_swaps_content_words_and_unlabels_their_role() -> None:
    lexicon = grammar.Grammar.of_size(120)
    words, pos, role = grammar.corpus(lexicon, 40, 32, seed=1, noise=0.3)
    noised = role == -1
    noised[:, 0] = False
    assert 0.1 < noised.sum() / (pos >= 0).sum() < 0.3
    assert all(words[s][t] not in grammar.FUNCTION_WORDS for s, t in zip(*np.nonzero(noised), strict=True))
    with pytest.raises(ValueError, match="noise = 1"):
        grammar.corpus(lexicon, 1, 8, 0, noise=1)


def test_the_grammar_reads_back_from_its_tokenizer_and_refuses_another() -> None:
    lexicon = grammar.Grammar.of_size(300)
    tokenizer = grammar.build_tokenizer(lexicon)
    assert grammar.Grammar.from_tokenizer(tokenizer) == lexicon
    assert len(tokenizer) == 300 + len(grammar.SPECIALS)
    with pytest.raises(ValueError, match="not a grammar tokenizer"):
        grammar.Grammar.from_tokenizer(arithmetic.build_tokenizer())
    with pytest.raises(ValueError, match=f"at least {grammar.MIN_VOCAB}"):
        grammar.Grammar.of_size(10)


def test_grammar_data_source_scores_every_word_with_pos_and_role_labels() -> None:
    tokenizer = grammar.build_tokenizer(grammar.Grammar.of_size(100))
    spec = DataSpec(source="grammar", num_examples=8, seq_len=20, seed=5)
    data = load_eval_data(spec, tokenizer, max_positions=64, vocab_size=len(tokenizer))
    assert data.input_ids.shape == (8, 20) and data.num_tokens == 8 * 19
    labels = data.token_labels()
    assert set(labels) == {"pos", "role"} and (labels["pos"] >= 0).all()
    decoded = [str(t) for t in tokenizer.convert_ids_to_tokens(data.input_ids[0].tolist())]
    assert [grammar.POS[p] for p in data.labels["pos"][0, 1:]] == [p for p, _ in _parse(decoded)[1:]]
    with pytest.raises(DataError, match="needs the grammar tokenizer"):
        load_eval_data(spec, arithmetic.build_tokenizer(), max_positions=64, vocab_size=100)


def test_save_steps_add_doublings_below_the_interval() -> None:
    assert sorted(save_steps(250, 100, early=True)) == [1, 2, 4, 8, 16, 32, 64, 100, 200]
    assert sorted(save_steps(250, 100, early=False)) == [100, 200]


def test_the_trainer_lowers_the_loss_and_saves_loadable_checkpoints(tmp_path: Path) -> None:
    from ckpt_analysis.zoo.train import GrammarTrainConfig, train_grammar

    run = build_grammar_run(tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint-0",
        "checkpoint-3",
        "checkpoint-6",
        "training.json",
    ]
    config = GrammarTrainConfig(vocab_size=60, seq_len=16, train_sequences=64, steps=40, save_every=40)
    loss = train_grammar(tmp_path / "longer", config)
    assert loss < np.log(60)  # below a uniform guess over the words


def test_a_training_run_records_its_seed_device_and_thread_count(tmp_path: Path) -> None:
    import json

    import torch

    record = json.loads((build_grammar_run(tmp_path / "run", seed=7) / "training.json").read_text())
    assert record["config"]["seed"] == 7 and record["config"]["steps"] == 6
    assert record["torch_threads"] == torch.get_num_threads() and record["device"] == "cpu"
    assert record["torch"] == torch.__version__
