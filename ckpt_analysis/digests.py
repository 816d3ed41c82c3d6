"""What a job's results depend on, as digests: the spec hash of its settings and the content
digests of its checkpoints, data and tokenizer (docs/jobs.md, "What the spec hash covers")."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from ckpt_analysis.checkpoints import CheckpointSource, expected_digest, file_digest
from ckpt_analysis.config import JobSpec


def job_identity(job: JobSpec) -> tuple[str, dict[str, str]]:
    """The job's spec hash and its parts (what a refused resume compares), from one digest pass."""
    content = content_digests(job)
    return spec_hash(job, content), spec_parts(job, content)


def spec_hash(job: JobSpec, content: dict[str, Any] | None = None) -> str:
    """Hash of what determines the numbers (docs/jobs.md, "What the spec hash covers").

    Covered: the analyses and every option that changes a number, plus ``content``, the
    content digests of the data and checkpoints (:func:`content_digests`).
    Not covered: where files sit (``output``, ``checkpoints.path``/``files``/``config``/
    ``cache_dir``/``tokenizer``, ``data.path``), ``checkpoints.device``, ``name``,
    ``[compute]`` and ``[slurm]``; so a moved project folder or a sweep resumed on a GPU
    keeps its hash. ``checkpoints.select`` is covered through ``content``, which lists the
    selected checkpoints, so a selection naming the same checkpoints hashes the same.
    """
    return _digest({**_hashed_settings(job), "content": content or {}})


def spec_parts(job: JobSpec, content: dict[str, Any]) -> dict[str, str]:
    """The spec hash's inputs, each hashed alone, so a refused resume can say which changed:
    ``settings`` (the job's options), ``checkpoints`` (their selection and weight files) and
    ``data`` (the data, sample and tokenizer files)."""
    inputs = {k: content.get(k) for k in ("data", "sample", "tokenizer")}
    return {
        "settings": _digest(_hashed_settings(job)),
        "checkpoints": _digest(content.get("checkpoints")),
        "data": _digest(inputs),
    }


def _hashed_settings(job: JobSpec) -> dict[str, Any]:
    payload = {k: v for k, v in job.to_dict().items() if k not in _UNHASHED_TABLES}
    payload["checkpoints"] = {**_EVERY_SOURCES_KEYS, **payload["checkpoints"]}
    for table, keys in _UNHASHED_KEYS.items():
        if payload.get(table) is not None:
            payload[table] = {k: v for k, v in payload[table].items() if k not in keys}
    for table, defaults in _HASHED_UNLESS_DEFAULT.items():
        if payload.get(table) is not None:
            kept = payload[table].items()
            payload[table] = {k: v for k, v in kept if k not in defaults or defaults[k] != v}
    return payload


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


_UNHASHED_TABLES = ("compute", "slurm", "name", "output")
_UNHASHED_KEYS = {
    "checkpoints": (
        "path",
        "files",
        "config",
        "cache_dir",
        "tokenizer",
        "device",
        "verify_digests",
        "select",
    ),
    "data": ("path", "cache_dir"),
    "sample": ("path", "cache_dir"),
}
_EVERY_SOURCES_KEYS: dict[str, Any] = {"repo": None, "revisions": "pythia", "pattern": None, "steps": {}}
"""Hashed keys of the other sources, as a ``[checkpoints]`` table held them before each source had
its own spec class: a spec hashes as it did then, so the stores written then still resume."""
_HASHED_UNLESS_DEFAULT: dict[str, dict[str, Any]] = {"data": {"pad_id": None}, "sample": {"pad_id": None}}
"""Options added after stores were written: left at their default they leave the hash as it was,
so those stores still resume."""


def content_digests(job: JobSpec) -> dict[str, Any]:
    """What the checkpoints and data hold, for the spec hash (docs/jobs.md, "What the spec hash covers").

    Per checkpoint: step, revision and, per weight file, the digest its storage names
    (:func:`~ckpt_analysis.checkpoints.expected_digest`), else its size and a sha256 of its first
    and last MiB. Data and tokenizer files: a sha256 of their bytes (a Hub name stands for itself).
    """
    source = CheckpointSource.from_spec(job.checkpoints)
    return {
        "checkpoints": [
            [c.step, c.revision, [_fingerprint(p) for p in source.weight_files(c)]]
            for c in source.checkpoints()
        ],
        "data": _path_digest(job.data.path),
        "sample": None if job.sample is None else _path_digest(job.sample.path),
        "tokenizer": _path_digest(job.checkpoints.tokenizer),
    }


def _fingerprint(path: Path) -> str:
    expected = expected_digest(path)
    if expected is not None:
        return expected[1]
    stat = path.stat()
    return _head_and_tail_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _head_and_tail_digest(path: str, size: int, _mtime_ns: int) -> str:
    """Size and a sha256 of the first and last MiB; cached per file version (path, size, mtime), so
    a store that grows (``watch``) does not reread the weight files it has already seen."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        hasher.update(handle.read(_MIB))
        handle.seek(max(size - _MIB, 0))
        hasher.update(handle.read(_MIB))
    return f"{size}:{hasher.hexdigest()[:32]}"


_MIB = 1 << 20


def _path_digest(where: str | None) -> str | None:
    if where is None or not Path(where).exists():
        return where
    root = Path(where)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    hasher = hashlib.sha256()
    for file in files:
        stat = file.stat()
        hasher.update(str(file.relative_to(root)).encode())
        hasher.update(_file_sha256(str(file), stat.st_size, stat.st_mtime_ns).encode())
    return hasher.hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """sha256 of a data or tokenizer file, cached per file version (path, size, mtime)."""
    return file_digest(Path(path), "sha256")
