"""Hub revisions: the ``hub`` source, Pythia's schedule, the cache's layout, and prefetching."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt_analysis.checkpoints.base import Checkpoint, CheckpointSource, weight_files_in
from ckpt_analysis.config import CheckpointsSpec, HubCheckpoints, hf_cache_dir
from ckpt_analysis.errors import CheckpointError, CkptAnalysisError, JobSpecError, one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

PYTHIA_TOKENS_PER_STEP = 2_097_152


def is_pythia(repo: str | None) -> bool:
    """Whether ``repo`` is one of the Pythia suite's (``EleutherAI/pythia-*``), all trained on
    batches of 1024 × 2048 tokens."""
    return repo is not None and repo.lower().startswith("eleutherai/pythia-")


# docs/jobs.md: step0, step1, step2, step4, ..., step512, then step1000 ... step143000 every 1000.
PYTHIA_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))

PYTHIA_REVISIONS: tuple[str, ...] = tuple(f"step{s}" for s in PYTHIA_STEPS)


class HubSource(CheckpointSource[HubCheckpoints], kind="hub"):
    """Revisions of a Hugging Face Hub repo, loaded through ``from_pretrained`` and a cache dir."""

    def available(self) -> list[Checkpoint]:
        revs = self.spec.revisions
        names = list(PYTHIA_REVISIONS) if revs == "pythia" or not isinstance(revs, list) else revs
        unknown = sorted(set(self.spec.steps) - {str(n) for n in names})
        if unknown:
            raise JobSpecError(
                f"checkpoints.steps names {unknown}, which checkpoints.revisions does not list"
            )
        ckpts = [self._checkpoint(str(name)) for name in names]
        return _unique_steps(sorted(ckpts, key=lambda c: c.step))

    def _checkpoint(self, revision: str) -> Checkpoint:
        step = self._step(revision)
        per_step = self.spec.tokens_per_step
        if per_step is None and (self.spec.revisions == "pythia" or is_pythia(self.spec.repo)):
            per_step = PYTHIA_TOKENS_PER_STEP
        seen = None if per_step is None else step * per_step
        return Checkpoint(step=step, revision=revision, ref=revision, tokens_seen=seen)

    def _step(self, revision: str) -> int:
        """The training step of a revision (docs/jobs.md, "Revisions and steps").

        ``checkpoints.steps`` first; then a ``stepN`` name; then a branch or commit resolved in
        the cache to the ``stepN`` revision at the same commit. Anything else is refused.
        """
        if revision in self.spec.steps:
            return self.spec.steps[revision]
        if match := re.fullmatch(r"step(\d+)", revision):
            return int(match.group(1))
        refs = self._refs()
        commit = refs.get(revision, revision)
        same = sorted(r for r, c in refs.items() if c == commit and re.fullmatch(r"step\d+", r))
        if same:
            log.info("revision %s is commit %s, the same as %s", revision, commit[:12], same[0])
            return int(same[0][4:])
        raise CheckpointError(
            f"revision {revision!r} names no training step: it is not 'stepN' and no cached stepN "
            f"revision points at its commit; map it with checkpoints.steps = {{ {revision} = N }}"
        )

    def _refs(self) -> dict[str, str]:
        """Revision name → commit, from the cache's ``refs/`` folder (as the Hub writes it)."""
        folder = _repo_cache(self.spec) / "refs"
        if not folder.is_dir():
            return {}
        return {str(p.relative_to(folder)): p.read_text().strip() for p in folder.rglob("*") if p.is_file()}

    def files_dir(self, ckpt: Checkpoint) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

        try:
            return Path(
                snapshot_download(
                    str(self.spec.repo),
                    revision=ckpt.revision,
                    cache_dir=self.spec.cache_dir,
                    local_files_only=True,
                )
            )
        except (LocalEntryNotFoundError, RevisionNotFoundError) as exc:
            raise CheckpointError(
                f"revision {ckpt.revision!r} of {self.spec.repo} is not in the cache "
                f"{self.spec.cache_dir or '(default HF cache)'} ({one_line(exc)}); "
                "run `ckpt-analysis prefetch` online"
            ) from exc
        except Exception as exc:  # a cache that is there but unreadable: say why, not "missing"
            raise CheckpointError(
                f"revision {ckpt.revision!r} of {self.spec.repo} could not be read from the cache "
                f"{self.spec.cache_dir or '(default HF cache)'}: {one_line(exc)}"
            ) from exc

    def weight_files(self, ckpt: Checkpoint) -> list[Path]:
        folder = self.files_dir(ckpt)
        try:
            return weight_files_in(folder, ckpt)
        except CheckpointError:
            _refuse_interrupted(folder, ckpt, _repo_cache(self.spec) / "blobs")
            raise

    def _load(self, ckpt: Checkpoint, dtype: torch.dtype, attn: str) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        self.weight_files(ckpt)  # clear error for a missing revision before transformers' own
        return AutoModelForCausalLM.from_pretrained(
            str(self.spec.repo),
            revision=ckpt.revision,
            cache_dir=self.spec.cache_dir,
            dtype=dtype,
            attn_implementation=attn,
        )


def _unique_steps(ckpts: list[Checkpoint]) -> list[Checkpoint]:
    """Refuse two checkpoints at one step, naming both (e.g. ``main`` beside the ``stepN`` it is)."""
    for a, b in itertools.pairwise(ckpts):
        if a.step == b.step:
            raise CheckpointError(
                f"checkpoints {a.revision!r} and {b.revision!r} are both step {a.step}; "
                "list one of them, or map steps with checkpoints.steps"
            )
    return ckpts


def _refuse_interrupted(snapshot: Path, ckpt: Checkpoint, blobs: Path) -> None:
    """Name an interrupted Hub download (snapshot links to nothing, ``blobs/*.incomplete``) and the
    command that finishes it, instead of a bare "no weight file"."""
    dangling = sorted(p.name for p in snapshot.iterdir() if p.is_symlink() and not p.exists())
    partial = list(blobs.glob("*.incomplete")) if blobs.is_dir() else []
    if dangling or partial:
        raise CheckpointError(
            f"checkpoint {ckpt.revision}: its download was interrupted ({len(partial)} incomplete "
            f"file(s) in {blobs}; {', '.join(dangling) or 'no file'} in {snapshot} point(s) to "
            "nothing); finish it with `ckpt-analysis prefetch JOB` online"
        )


def prefetch(spec: CheckpointsSpec, *, offline: bool) -> tuple[list[str], list[str]]:
    """Download (or, offline, only look up) every selected revision; returns (cached, missing).

    A revision counts as cached only with its config and weight files. A revision or repo the Hub
    does not have is missing; any other failure (network, authentication) is raised as one line.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    if not isinstance(spec, HubCheckpoints):
        raise JobSpecError("prefetch applies to checkpoints.source = 'hub' only")
    source = HubSource(spec)
    cached, missing = [], []
    for ckpt in source.checkpoints():
        try:
            folder = snapshot_download(
                str(spec.repo),
                revision=ckpt.revision,
                cache_dir=spec.cache_dir,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
            )
            weight_files_in(Path(folder), ckpt)
            cached.append(ckpt.revision)
        except (LocalEntryNotFoundError, RevisionNotFoundError, CheckpointError) as exc:
            log.info("revision %s is missing: %s", ckpt.revision, one_line(exc))
            missing.append(ckpt.revision)
        except Exception as exc:
            raise CheckpointError(
                f"could not fetch revision {ckpt.revision} of {spec.repo}: {one_line(exc)}"
            ) from exc
    return cached, missing


def _repo_cache(spec: HubCheckpoints) -> Path:
    """The repo's folder in the Hub cache: ``checkpoints.cache_dir``, else ``HF_HUB_CACHE``, else
    ``HF_HOME/hub`` (``~/.cache/huggingface/hub``), as huggingface_hub resolves it."""
    cache = hf_cache_dir(spec.cache_dir, env_var="HF_HUB_CACHE", subfolder="hub")
    return cache / ("models--" + str(spec.repo).replace("/", "--"))


def hub_cache_complete(spec: CheckpointsSpec) -> bool:
    """Whether every selected Hub revision has its config and weights in the cache, looked up
    without importing huggingface_hub (which reads ``HF_HUB_OFFLINE`` once, at import)."""
    if not isinstance(spec, HubCheckpoints):
        return False
    base = _repo_cache(spec)
    try:
        ckpts = HubSource(spec).checkpoints()
        for ckpt in ckpts:
            folder = base / "snapshots" / (base / "refs" / ckpt.revision).read_text().strip()
            if not (folder / "config.json").is_file():
                return False
            weight_files_in(folder, ckpt)
    except (OSError, CkptAnalysisError):
        return False
    return bool(ckpts)
