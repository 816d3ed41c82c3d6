"""Test builders with overridable defaults: tiny GPTNeoX checkpoints, a fake Hub cache, job files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM, PreTrainedModel

from ckpt_analysis.config import to_toml
from ckpt_analysis.tasks.arithmetic import VOCAB, build_tokenizer
from ckpt_analysis.zoo.standin import write_hub_revision
from ckpt_analysis.zoo.train import GrammarTrainConfig, tiny_gpt_neox, train_grammar

if TYPE_CHECKING:
    import pytest

    from ckpt_analysis.data import EvalData
    from ckpt_analysis.registry import UnitContext

CLI = [sys.executable, "-m", "ckpt_analysis"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``ckpt-analysis ARGS`` in a new process; stdout and stderr with rich's wrapping undone."""
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    result.stdout = " ".join(result.stdout.split())
    result.stderr = " ".join(result.stderr.split())
    return result


TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_positions": 32}


def tiny_model(seed: int = 0, **overrides: Any) -> GPTNeoXForCausalLM:
    """A tiny random GPTNeoX over the addition vocabulary."""
    return tiny_gpt_neox(len(VOCAB), **{**TINY, **overrides}, seed=seed)


FAMILIES = ("gpt2", "llama", "opt")
"""Decoder families beside GPT-NeoX that the toolkit's sites and Hessians are tested on."""


def family_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` over the addition vocabulary: GPT-2 (its config says
    ``n_layer``/``n_embd``), Llama with grouped-query attention (2 key/value heads for 4 query
    heads), or OPT (fc1/fc2 inside the layer)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(seed)
    v = len(VOCAB)
    if family == "gpt2":
        config = GPT2Config(vocab_size=v, n_embd=16, n_layer=2, n_head=4, n_positions=32)
        return _eval(GPT2LMHeadModel(config))
    if family == "llama":
        gqa = LlamaConfig(
            vocab_size=v,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        return _eval(LlamaForCausalLM(gqa))
    opt = OPTConfig(
        vocab_size=v,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        pad_token_id=0,  # the tokenizer's <pad>: OPT's default (1) is <bos> here, a real input token
        bos_token_id=1,
        eos_token_id=2,
    )
    return _eval(OPTForCausalLM(opt))


def _eval(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` in eval mode (transformers types ``eval()`` as returning Any)."""
    model.eval()
    return model


def trajectory(n: int, *, seed: int = 0, **overrides: Any) -> list[GPTNeoXForCausalLM]:
    """``n`` checkpoints of one model, each a small random step from the previous one."""
    model = tiny_model(seed, **overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    models = []
    for _ in range(n):
        models.append(model)
        model = tiny_model(seed, **overrides)
        model.load_state_dict(models[-1].state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return models


def save_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)  # type: ignore[operator]
    build_tokenizer().save_pretrained(folder)
    return folder


def build_local_run(
    root: Path, steps: list[int], *, name: str = "checkpoint-{step}", seed: int = 0, **overrides: Any
) -> Path:
    """A run folder of ``save_pretrained`` checkpoints, one per step (model size via ``overrides``)."""
    for step, model in zip(steps, trajectory(len(steps), seed=seed, **overrides), strict=True):
        save_checkpoint(model, root / name.format(step=step))
    return root


def build_grammar_run(root: Path, **overrides: Any) -> Path:
    """A short real training run on a small grammar: checkpoints 0, 3 and 6 by default."""
    config = {
        "vocab_size": 60,
        "seq_len": 16,
        "train_sequences": 64,
        "steps": 6,
        "save_every": 3,
        "early_saves": False,
        "batch_size": 16,
        "hidden_size": 32,
        "device": "cpu",
    }
    train_grammar(root, GrammarTrainConfig(**{**config, **overrides}))
    return root


def build_fake_hub(cache_dir: Path, repo: str, revisions: list[str], *, seed: int = 0) -> Path:
    """A Hugging Face cache holding ``repo`` at ``revisions`` of a tiny model's trajectory, laid out
    as the Hub writes it (:func:`~ckpt_analysis.zoo.standin.write_hub_revision`)."""
    for revision, model in zip(revisions, trajectory(len(revisions), seed=seed), strict=True):
        write_hub_revision(cache_dir, repo, revision, model, build_tokenizer())  # main → the last
    return cache_dir


def build_hub_dataset(
    cache_dir: Path, repo: str, texts: dict[str, list[str]], *, split: str = "train"
) -> Path:
    """A ``datasets`` cache holding the Hub dataset ``repo`` as ``load_dataset(repo, subset)`` leaves
    it online: per subset, ``<owner>___<name>/<subset>/0.0.0/<commit>/`` with the arrow shard and
    ``dataset_info.json`` that datasets' own json builder prepares from ``{"text": ...}`` rows.
    Only the folder is placed by hand (offline, a builder cannot name a Hub repo as its origin)."""
    import hashlib
    import json
    import shutil

    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    name = repo.split("/")[-1]
    for subset, rows in texts.items():
        source = cache_dir / "sources" / f"{subset}.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        files = DataFilesDict.from_patterns({split: [source.name]}, base_path=str(source.parent))
        commit = hashlib.sha1(repo.encode()).hexdigest()  # every subset of one revision
        builder = Json(
            cache_dir=str(cache_dir / "staging"),
            dataset_name=name,
            config_name=subset,
            hash=commit,
            data_files=files,
        )
        builder.download_and_prepare()
        target = cache_dir / repo.replace("/", "___") / subset / "0.0.0"
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(builder.cache_dir, target / commit)
    shutil.rmtree(cache_dir / "staging")
    return cache_dir


def job_dict(run_dir: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    """A covariance job over a local run; top-level tables in ``overrides`` are merged, except a
    ``checkpoints`` table of another ``source``, which replaces the local one."""
    job: dict[str, Any] = {
        "name": "test-job",
        "output": str(output),
        "checkpoints": {"source": "local", "path": str(run_dir)},
        "data": {"source": "addition", "num_examples": 64},
        "analyses": {"covariance": {}},
        "compute": {"executor": "inprocess", "batch_size": 32},
    }
    for key, value in overrides.items():
        if key == "checkpoints" and value.get("source", "local") != "local":
            job[key] = value
        elif isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def write_job(path: Path, run_dir: Path, output: Path, **overrides: Any) -> Path:
    path.write_text(to_toml(job_dict(run_dir, output, **overrides)))
    return path


def _with_flat(
    base: dict[str, torch.Tensor], names: tuple[str, ...], shapes: list[torch.Size], vector: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``base`` with the named parameters replaced by consecutive slices of ``vector``."""
    params, offset = dict(base), 0
    for name, shape in zip(names, shapes, strict=True):
        size = int(torch.tensor(shape).prod())
        params[name] = vector[offset : offset + size].view(shape)
        offset += size
    return params


def dense_hessian(model: torch.nn.Module, names: tuple[str, ...], sample: Any) -> torch.Tensor:
    """The dense Hessian of the mean scored-token loss w.r.t. the named parameters (ground truth)."""
    from torch.func import functional_call

    from ckpt_analysis.attention import differentiable_attention
    from ckpt_analysis.losses import scored_token_losses

    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in names]
    flat = torch.cat([base[n].reshape(-1) for n in names])
    batch = [torch.from_numpy(a) for a in (sample.input_ids, sample.attention_mask, sample.score_mask)]

    def loss(vector: torch.Tensor) -> torch.Tensor:
        params = _with_flat(base, names, shapes, vector)

        def call(**kwargs: Any) -> Any:
            return functional_call(model, params, args=(), kwargs=kwargs)

        with differentiable_attention(model):
            return scored_token_losses(call, *batch).mean()  # type: ignore[arg-type]

    dense: torch.Tensor = torch.autograd.functional.hessian(loss, flat)
    return dense


def per_token_reverse(
    model: torch.nn.Module, data: Any, directions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token gradients and per-token Hessian quadratic forms by reverse-over-reverse autograd."""
    from ckpt_analysis.attention import differentiable_attention
    from ckpt_analysis.losses import scored_token_losses

    params = list(model.parameters())
    batch = [torch.from_numpy(a) for a in (data.input_ids, data.attention_mask, data.score_mask)]
    with differentiable_attention(model):
        losses = scored_token_losses(model, *batch)
        first, second = [], []
        for loss in losses:
            grads = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            first.append(directions @ flat.detach())
            curv = []
            for d in directions:
                hd = torch.autograd.grad(flat @ d, params, retain_graph=True)
                curv.append(torch.cat([h.reshape(-1) for h in hd]) @ d)
            second.append(torch.stack(curv))
    return losses.detach(), torch.stack(first, dim=1), torch.stack(second, dim=1)


def units_in_flight(store: Path) -> dict[str, int]:
    """Units whose sidecar says running and whose done marker is not set → their owner's pid."""
    import json

    from ckpt_analysis.store import UNITS_DIR, done_flags, store_meta

    if not (store / "zarr.json").exists():
        return {}
    done = done_flags(store)
    records = {f.stem: json.loads(f.read_text()) for f in (store / UNITS_DIR).glob("*.json")}
    flight = {}
    for i, unit in enumerate(u["id"] for u in store_meta(store)["units"]):
        record = records.get(unit.replace("/", "__"), {})
        if not done[i] and record.get("status") == "running":
            flight[unit] = int(record["pid"])
    return flight


def stop_mid_unit(store: Path, *, timeout: float = 120.0) -> dict[str, int]:
    """SIGSTOP the owners of units in flight in ``store`` (processes on this host), once some unit
    is caught in flight; returns those units → pids. The caller continues or kills them."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = set(units_in_flight(store).values())
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        caught = {u: p for u, p in units_in_flight(store).items() if p in pids}
        if caught:
            return caught
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"no unit of {store} was caught in flight within {timeout:.0f} s")


def run_and_kill(
    job_path: Path,
    store: Path,
    *,
    after_done: int,
    timeout: float = 120.0,
    command: tuple[str, ...] = ("run",),
) -> int:
    """Run ``ckpt-analysis <command> JOB`` in a subprocess, SIGKILL it once ``after_done`` units are done.

    Returns how many units were done when it died.
    """
    import signal
    import subprocess
    import sys
    import time

    from ckpt_analysis.store import done_flags

    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt_analysis", *command, str(job_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, done = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and done < after_done:
        time.sleep(0.02)
        if (store / "zarr.json").exists():
            done = int(done_flags(store).sum())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(done_flags(store).sum())


def dense_corpus_statistics(index: np.ndarray, mask: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """docs/leading_terms.md by dense one-hot products (O(N·T·K²)): the ground truth for the scatter-adds.

    ``index`` holds vocabulary ranks (−1 outside the vocabulary) of ``(N, T + 1)`` sequences.
    """
    onehot = np.zeros((*index.shape, k))
    n, pos = np.nonzero(index >= 0)
    onehot[n, pos, index[n, pos]] = 1.0
    x, y = onehot[:, :-1], onehot[:, 1:]
    ok = (mask[:, 1:] > 0).astype(float)[..., None]
    nt = ok.sum()
    centred_y = (y - 1.0 / k) * ok
    t = np.arange(1, x.shape[1] + 1)[None, :, None]
    xbar = np.cumsum(x, axis=1) / t
    bigram = np.einsum("nti,ntj->ij", x * ok, y - 1.0 / k, optimize=True) / nt
    context = np.einsum("nti,ntj->ij", centred_y, xbar, optimize=True) / nt
    interchange = bigram.T @ bigram
    value = context.T @ bigram.T
    g = context.T @ interchange
    scores = np.einsum("nki,ij,ntj->ntk", x, g, y - 1.0 / k, optimize=True)
    causal = np.tril(np.ones((x.shape[1], x.shape[1])))[None]
    scores = scores * causal
    q = (scores - scores.sum(-1, keepdims=True) / t) * causal / t * ok
    qk = np.einsum("nti,ntk,nkj->ij", x, q, x, optimize=True) / nt
    delta = np.array([np.trace(q.sum(0), offset=-m) for m in range(x.shape[1])]) / nt
    return {
        "bigram": bigram,
        "context": context,
        "interchange": interchange,
        "value": value,
        "g": g,
        "qk": qk,
        "delta": delta,
    }


def independent_activations(model: torch.nn.Module, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Activations from HF's hidden_states and a plain re-computation of each block (no hooks)."""
    x = torch.from_numpy(ids)
    with torch.no_grad():
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states
        out: dict[str, list[np.ndarray]] = {"resid_pre": [], "attn_out": [], "mlp_out": [], "resid_post": []}
        pos = torch.arange(ids.shape[1])[None]
        neox: Any = model.get_submodule("gpt_neox")  # a GPTNeoXModel, whatever the loader typed
        rotary = neox.rotary_emb(hidden[0], pos)
        n = ids.shape[1]
        causal = torch.full((n, n), float("-inf"), dtype=hidden[0].dtype).triu(1)[None, None]
        for i, layer in enumerate(neox.layers):
            h = hidden[i]
            attn = layer.attention(
                layer.input_layernorm(h), attention_mask=causal, position_embeddings=rotary
            )[0]
            mlp = layer.mlp(layer.post_attention_layernorm(h))  # GPT-NeoX parallel residual
            for site, value in (
                ("resid_pre", h),
                ("attn_out", attn),
                ("mlp_out", mlp),
                ("resid_post", h + attn + mlp),
            ):
                out[site].append(value.double().numpy())
    return {k: np.stack(v) for k, v in out.items()}


def assert_same_results(a: str | Path, b: str | Path) -> None:
    """Two stores hold the same variables with bit-identical values."""
    from ckpt_analysis.store import open_results

    da, db = open_results(a), open_results(b)
    assert set(da.data_vars) == set(db.data_vars)
    for name in da.data_vars:
        np.testing.assert_array_equal(da[name].values, db[name].values, err_msg=name)


def slurm_ready() -> bool:
    """An idle SLURM answers here (CI starts one with slurm/local-cluster.sh)."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    up = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
    return up.returncode == 0 and "idle" in up.stdout


def needs_slurm() -> pytest.MarkDecorator:
    """Skip without SLURM, unless CKPT_ANALYSIS_REQUIRE_SLURM=1 (CI), where the test must run."""
    import pytest

    required = os.environ.get("CKPT_ANALYSIS_REQUIRE_SLURM") == "1"
    reason = "no idle SLURM here (CI starts one: slurm/local-cluster.sh)"
    return pytest.mark.skipif(not required and not slurm_ready(), reason=reason)


def dense_logit_jacobian(
    model: torch.nn.Module, names: tuple[str, ...], sample: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored logits z (token, vocab) and their full Jacobian (token, vocab, param) in the
    named parameters, by autograd (ground truth)."""
    from torch.func import functional_call

    from ckpt_analysis.attention import differentiable_attention

    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in names]
    flat = torch.cat([base[n].reshape(-1) for n in names])
    ids, mask = torch.from_numpy(sample.input_ids), torch.from_numpy(sample.attention_mask)
    scored = torch.from_numpy(sample.score_mask)[:, 1:].bool()

    def logits(vector: torch.Tensor) -> torch.Tensor:
        params = _with_flat(base, names, shapes, vector)
        with differentiable_attention(model):
            out = functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask})
        return torch.as_tensor(out.logits[:, :-1][scored])

    jac: torch.Tensor = torch.autograd.functional.jacobian(logits, flat)
    return logits(flat).detach(), jac


def dense_ggn_and_fisher(
    model: torch.nn.Module, names: tuple[str, ...], sample: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense GGN (1/N) Σ_x J_xᵀ (diag p_x − p_x p_xᵀ) J_x and empirical Fisher (1/N) Σ_x g_x g_xᵀ,
    from full Jacobians of the scored logits and per-token gradients (ground truth)."""
    z, jac = dense_logit_jacobian(model, names, sample)
    scored = torch.from_numpy(sample.score_mask)[:, 1:].bool()
    targets = torch.from_numpy(sample.input_ids)[:, 1:][scored]
    p = torch.softmax(z, dim=-1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, V, V)
    n = z.shape[0]
    ggn = torch.einsum("nvp,nvw,nwq->pq", jac, h, jac) / n
    per_token = torch.einsum("nv,nvp->np", p - torch.nn.functional.one_hot(targets, z.shape[1]).to(p), jac)
    return ggn, per_token.T @ per_token / n


def unit_context(
    model: PreTrainedModel,
    data: EvalData,
    analyses: dict[str, Any],
    *,
    batch_size: int | Literal["auto"] = 8,
) -> UnitContext:
    """A unit's context over one in-memory model and an unlabelled token set, to call an
    analysis's ``compute`` directly (every checkpoint index loads ``model``; nothing is stored)."""
    from ckpt_analysis.config import ComputeSpec, DataSpec, JobSpec, LocalCheckpoints
    from ckpt_analysis.registry import UnitContext

    device: Literal["cpu", "cuda"] = "cuda" if model.device.type == "cuda" else "cpu"
    spec = LocalCheckpoints(source="local", path="unused", device=device)
    job = JobSpec(
        "test", "unused", spec, DataSpec(source="topics"), analyses, ComputeSpec(batch_size=batch_size)
    )
    return UnitContext(job, [], model.config.to_dict(), data, lambda _: model, lambda *_a, **_k: np.empty(0))


def random_eval_data(vocab: int, sequences: int, length: int, *, seed: int = 0) -> EvalData:
    """Random token ids, right-padded to random lengths, a random half of the positions scored."""
    from ckpt_analysis.data import EvalData

    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, sequences)
    attention = (np.arange(length) < lengths[:, None]).astype(np.int64)
    return EvalData(
        rng.integers(0, vocab, (sequences, length)), attention, rng.random((sequences, length)) < 0.5
    )


BATCH = 4
"""Sequences per batch in :func:`ops_per_batch`."""


def ops_per_batch(
    model: PreTrainedModel, run: Callable[[EvalData], object], *, head: bool = False
) -> tuple[float, int]:
    """(ops, data-dependent ops) ``run(data)`` dispatches per batch of :data:`BATCH` sequences
    beyond the bare forwards over the same batches (through the LM head if ``head``)."""
    from ckpt_analysis.dispatch import OpCounter

    ops, dependent = _per_batch(model, run, OpCounter, lambda c: (c.total, c.data_dependent), head=head)
    return ops, int(dependent)


def syncs_per_batch(
    model: PreTrainedModel, run: Callable[[EvalData], object], *, head: bool = False
) -> float:
    """Host-device synchronisations ``run(data)`` adds per batch to the bare forwards (CUDA)."""
    from ckpt_analysis.dispatch import SyncCounter

    return _per_batch(model, run, SyncCounter, lambda c: (c.total,), head=head)[0]


def _per_batch(
    model: PreTrainedModel,
    run: Callable[[EvalData], object],
    counter: Callable[[], Any],
    read: Callable[[Any], tuple[int, ...]],
    *,
    head: bool,
) -> tuple[float, ...]:
    """What ``read(counter)`` counts per batch in ``run`` beyond bare forwards: the difference between
    runs over 4 and 2 batches, so once-per-unit work cancels out."""
    excess = []
    for batches in (2, 4):
        data = random_eval_data(model.config.vocab_size, BATCH * batches, 12)
        with counter() as unit:
            run(data)
        with counter() as bare, torch.inference_mode():
            for ids, attn, _ in data.batches(BATCH, model.device):
                (model if head else model.base_model)(input_ids=ids, attention_mask=attn)
        excess.append(np.subtract(read(unit), read(bare)))
    return tuple(float(x) for x in (excess[1] - excess[0]) / 2)
