"""Stand-ins for Hub checkpoints: Pythia's real architecture with random weights, in a Hub-layout cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PYTHIA_70M: dict[str, Any] = {
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "use_parallel_residual": True,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "tie_word_embeddings": False,
}
"""``EleutherAI/pythia-70m``'s ``config.json`` fields that shape the model (70.4M parameters)."""

PYTHIA_410M: dict[str, Any] = PYTHIA_70M | {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}
"""``EleutherAI/pythia-410m``'s shape (405M parameters)."""

PYTHIA_1_4B: dict[str, Any] = PYTHIA_70M | {
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 8192,
}
"""``EleutherAI/pythia-1.4b``'s shape (1.41B parameters)."""

PYTHIA_SIZES: dict[str, dict[str, Any]] = {"70m": PYTHIA_70M, "410m": PYTHIA_410M, "1.4b": PYTHIA_1_4B}
"""The stand-in shapes by the size in the Hub repo's name (``EleutherAI/pythia-<size>``)."""


def write_hub_revision(
    cache_dir: Path, repo: str, revision: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """Save ``model`` and ``tokenizer`` as the Hub cache holds a revision: ``refs/<revision>`` →
    commit, ``snapshots/<commit>/<file>`` symlinks into ``blobs/``, each blob named by its content
    (sha256 for weights, git's blob sha1 for small files). Returns the snapshot folder."""
    base = cache_dir / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "blobs").mkdir(exist_ok=True)
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    snapshot = base / "snapshots" / commit
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    for file in sorted(snapshot.iterdir()):
        data = file.read_bytes()
        if file.suffix in (".safetensors", ".bin"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        (base / "blobs" / blob).write_bytes(data)
        file.unlink()
        file.symlink_to(Path("..") / ".." / "blobs" / blob)
    (base / "refs" / revision).write_text(commit)  # no trailing newline, as the Hub writes it
    (base / "refs" / "main").write_text(commit)
    return snapshot


def pythia_standin(
    cache_dir: Path,
    revisions: list[str],
    *,
    repo: str = "EleutherAI/pythia-70m",
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A Hub cache of ``repo`` at ``revisions``: the real Pythia-70M architecture (or ``config``),
    random weights stored in float16 as Pythia's are, and a word-level tokenizer over its vocabulary.
    ``main`` points at the last revision. Returns ``cache_dir``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from ckpt_analysis.tasks import topics

    fields = config or PYTHIA_70M
    tokenizer = topics.build_tokenizer(int(fields["vocab_size"]))
    for i, revision in enumerate(revisions):
        torch.manual_seed(seed + i)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields))
        torch.nn.Module.to(model, torch.float16)  # transformers mis-types .to
        write_hub_revision(cache_dir, repo, revision, model, tokenizer)
    return cache_dir
