"""An annotated toy grammar in the spirit of TRACE's ABSynth: sentences whose every token carries a
part-of-speech and a semantic-role label (docs/trace_parity.md, "The grammar corpus")."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

POS = ("det", "noun", "verb", "adj", "prep", "punct")
ROLES = ("agent", "patient", "action", "location", "attribute", "function")
"""Label levels: ``label_pos`` and ``label_role`` store the index into these, −1 where absent."""
SPECIALS = ("<pad>", "<bos>", "<eos>")
DETERMINERS = ("the", "a", "this", "every")
PREPOSITIONS = ("in", "on", "near", "under", "behind", "beside")
FUNCTION_WORDS = (*DETERMINERS, *PREPOSITIONS, ".")
CONTENT_SHARES = {"anim": 0.2, "obj": 0.25, "place": 0.1, "vt": 0.15, "vi": 0.1, "adj": 0.2}
"""Share of the content vocabulary per word class: animate nouns (agents, or patients of
odd-numbered transitive verbs), object nouns (patients of even-numbered ones), place nouns
(locations), transitive and intransitive verbs, adjectives. Words are spelled ``<class><index>``."""
CLASS_POS = {"anim": "noun", "obj": "noun", "place": "noun", "vt": "verb", "vi": "verb", "adj": "adj"}
TEMPLATES: tuple[tuple[str, float], ...] = (
    ("agent vt patient .", 0.35),
    ("agent vt patient prep location .", 0.25),
    ("agent vi prep location .", 0.25),
    ("agent vi .", 0.15),
)
"""Sentence templates and their probabilities; each noun slot is a noun phrase (determiner, an
adjective with probability :data:`ADJECTIVE_RATE`, the noun)."""
ADJECTIVE_RATE = 0.3
MIN_VOCAB = len(FUNCTION_WORDS) + 4 * len(CONTENT_SHARES)


@dataclass(frozen=True)
class Grammar:
    """The lexicon: word strings per class, each class drawn Zipf-like (p ∝ 1/rank)."""

    words: dict[str, tuple[str, ...]]

    @classmethod
    def of_size(cls, vocab_size: int) -> Grammar:
        """A grammar of ``vocab_size`` words (function words included; at least :data:`MIN_VOCAB`)."""
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"a grammar needs at least {MIN_VOCAB} words, not {vocab_size}")
        content = vocab_size - len(FUNCTION_WORDS)
        counts = {c: max(4, int(share * content)) for c, share in CONTENT_SHARES.items()}
        counts["obj"] += content - sum(counts.values())
        return cls({c: tuple(f"{c}{i:04d}" for i in range(n)) for c, n in counts.items()})

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> Grammar:
        """The grammar a tokenizer of :func:`build_tokenizer` spells (the checkpoint knows its corpus)."""
        vocab = tokenizer.get_vocab()
        words = {c: tuple(sorted(w for w in vocab if word_class(w) == c)) for c in CLASS_POS}
        missing = [w for w in FUNCTION_WORDS if w not in vocab] + [c for c, w in words.items() if not w]
        if missing:
            raise ValueError(f"the tokenizer is not a grammar tokenizer (it lacks {', '.join(missing[:5])})")
        return cls(words)

    @property
    def vocabulary(self) -> list[str]:
        return [*FUNCTION_WORDS, *(w for c in CLASS_POS for w in self.words[c])]


def word_class(word: str) -> str | None:
    """The content-word class a word is spelled in (``<class><index>``), else None."""
    return next((c for c in CLASS_POS if word.startswith(c) and word[len(c) :].isdigit()), None)


def word_pos(word: str) -> int:
    """A word's part of speech (index into :data:`POS`) from the lexicon's spelling; −1 for a word
    outside the grammar (a special token)."""
    if word in FUNCTION_WORDS:
        return POS.index("det" if word in DETERMINERS else "prep" if word in PREPOSITIONS else "punct")
    kind = word_class(word)
    return POS.index(CLASS_POS[kind]) if kind else -1


def build_tokenizer(grammar: Grammar) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the specials and the grammar's words (a real HF one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *grammar.vocabulary])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


@functools.cache
def _zipf_cdf(n: int) -> np.ndarray:
    """Cumulative Zipf weights p_k ∝ 1/k over n choices (docs/trace_parity.md, "The grammar
    corpus"); the last entry is infinite so a draw of 1 − ε never falls past it."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1))
    cdf /= cdf[-1]
    cdf[-1] = np.inf
    return cdf


class _Sampler:
    def __init__(self, grammar: Grammar, rng: np.random.Generator, noise: float) -> None:
        self.grammar, self.rng, self.noise = grammar, rng, noise
        self.content = [w for c in CLASS_POS for w in grammar.words[c]]
        self.content_pos = [POS.index(CLASS_POS[c]) for c in CLASS_POS for _ in grammar.words[c]]

    def zipf(self, options: tuple[str, ...]) -> str:
        return options[int(np.searchsorted(_zipf_cdf(len(options)), self.rng.random(), side="right"))]

    def sentence(self) -> list[tuple[str, int, int]]:
        """``(word, pos, role)`` triples of one sentence, derived from a template."""
        template = TEMPLATES[self.rng.choice(len(TEMPLATES), p=[p for _, p in TEMPLATES])][0]
        out: list[tuple[str, int, int]] = []
        verb = -1
        for slot in template.split():
            if slot in ("agent", "patient", "location"):
                noun_class = {"agent": "anim", "location": "place"}.get(slot) or (
                    "obj" if verb % 2 == 0 else "anim"
                )
                out += self.noun_phrase(noun_class, ROLES.index(slot))
            elif slot in ("vt", "vi"):
                word = self.zipf(self.grammar.words[slot])
                verb = self.grammar.words[slot].index(word)
                out.append((word, POS.index("verb"), ROLES.index("action")))
            else:
                word = self.zipf(PREPOSITIONS) if slot == "prep" else "."
                out.append((word, POS.index(slot if slot == "prep" else "punct"), ROLES.index("function")))
        return [self.noised(*t) for t in out]

    def noun_phrase(self, noun_class: str, role: int) -> list[tuple[str, int, int]]:
        phrase = [(self.zipf(DETERMINERS), POS.index("det"), ROLES.index("function"))]
        if self.rng.random() < ADJECTIVE_RATE:
            phrase.append((self.zipf(self.grammar.words["adj"]), POS.index("adj"), ROLES.index("attribute")))
        return [*phrase, (self.zipf(self.grammar.words[noun_class]), POS.index("noun"), role)]

    def noised(self, word: str, pos: int, role: int) -> tuple[str, int, int]:
        """With probability ``noise`` a content word becomes a uniformly random content word: its
        part of speech is the new word's, and it has no role (−1)."""
        if word in FUNCTION_WORDS or self.noise == 0 or self.rng.random() >= self.noise:
            return word, pos, role
        k = int(self.rng.integers(len(self.content)))
        return self.content[k], self.content_pos[k], -1


def corpus(
    grammar: Grammar, num_sequences: int, seq_len: int, seed: int, *, noise: float = 0.0
) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """``num_sequences`` sequences of ``seq_len`` words: ``<bos>`` then whole sentences packed in
    order (the last one cut at the end), and their ``(sequence, position)`` POS and role labels
    (−1 at ``<bos>``). Deterministic for a seed."""
    if not 0 <= noise < 1:
        raise ValueError(f"noise = {noise} must be in [0, 1)")
    sampler = _Sampler(grammar, np.random.default_rng(seed), noise)
    words: list[list[str]] = []
    pos = np.full((num_sequences, seq_len), -1, dtype=np.int64)
    role = np.full((num_sequences, seq_len), -1, dtype=np.int64)
    for n in range(num_sequences):
        row: list[tuple[str, int, int]] = [("<bos>", -1, -1)]
        while len(row) < seq_len:
            row += sampler.sentence()
        row = row[:seq_len]
        words.append([w for w, _, _ in row])
        pos[n], role[n] = [p for _, p, _ in row], [r for _, _, r in row]
    return words, pos, role


def encode(tokenizer: PreTrainedTokenizerBase, words: list[list[str]]) -> np.ndarray:
    """Token ids ``(sequences, positions)`` through the tokenizer itself, one per word."""
    ids = tokenizer([" ".join(row) for row in words], add_special_tokens=False)["input_ids"]
    out = np.asarray(ids, dtype=np.int64)
    if out.shape != (len(words), len(words[0])):
        raise ValueError("the tokenizer does not spell grammar words one token each")
    return out
