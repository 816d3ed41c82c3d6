"""Checking a store: chunk checksums, and the chunks done units wrote (docs/results.md, "Integrity")."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ckpt_analysis.progress import progress
from ckpt_analysis.store import (
    checksum_ok,
    chunk_owners,
    done_records,
    missing_chunks,
    read_sidecar,
    reset_chunks,
    set_done,
    store_meta,
    write_sidecar,
)


@dataclass(frozen=True)
class Damage:
    """One damaged chunk file (relative to the store) and the done unit that wrote it, if known."""

    file: str
    problem: Literal["missing", "checksum"]
    unit: str | None


@dataclass
class Report:
    """What :func:`verify_store` found."""

    damage: list[Damage] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    unchecked_arrays: list[str] = field(default_factory=list)
    """Arrays written without checksums (stores made before checksums): only presence is checked."""
    unrecorded_units: int = 0
    """Done units whose sidecar lists no chunk files (written before chunk records were kept)."""

    @property
    def clean(self) -> bool:
        return not self.damage

    def by_unit(self) -> dict[str | None, list[Damage]]:
        """Damage grouped by unit; ``None`` holds chunks no done unit claims (tables, coordinates)."""
        grouped: dict[str | None, list[Damage]] = defaultdict(list)
        for d in self.damage:
            grouped[d.unit].append(d)
        return dict(grouped)


def verify_store(path: str | Path) -> Report:
    """Read every chunk file of the store, check each checksummed one, and check that every chunk a
    done unit wrote is present. Draws a progress bar (or logs) over the arrays.

    Safe while a job writes: a unit finishing meanwhile may be counted either way, never as damage
    unless its chunks are. Raises StoreError if ``path`` is not a results store.
    """
    root = Path(path)
    records = done_records(root)  # raises the one clear error for a path that is not a store
    owners = chunk_owners(records)
    report = Report(unrecorded_units=sum("chunks" not in r for r in records))
    start = time.perf_counter()
    arrays = _arrays(root)
    with progress(len(arrays), f"verify {root.name}") as advance:
        for name, checksummed in arrays.items():
            if not checksummed:
                report.unchecked_arrays.append(name)
            for file in _chunk_files(root / name / "c"):
                _check_file(root, file, checksummed, owners, report)
            advance(name, True)
    for unit, files in missing_chunks(root, owners).items():
        report.damage += [Damage(file, "missing", unit) for file in files]
    report.seconds = time.perf_counter() - start
    return report


def _arrays(root: Path) -> dict[str, bool]:
    """Every array of the store (its folder name) → whether its chunks carry a crc32c checksum."""
    found = {}
    for meta in sorted(root.glob("*/zarr.json")):
        raw = json.loads(meta.read_text())
        if raw.get("node_type") == "array":
            found[meta.parent.name] = any(c["name"] == "crc32c" for c in raw["codecs"])
    return found


def _chunk_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` (an array's chunks), from directory listings alone."""
    for where, _, files in os.walk(folder):
        yield from (Path(where, f) for f in sorted(files))


def _check_file(root: Path, file: Path, checksummed: bool, owners: dict[str, str], report: Report) -> None:
    raw = np.fromfile(file, dtype=np.uint8)
    report.files += 1
    report.bytes += len(raw)
    if not checksummed:
        return
    if not checksum_ok(raw):
        rel = file.relative_to(root).as_posix()
        report.damage.append(Damage(rel, "checksum", owners.get(rel)))


def repair(path: str | Path, report: Report) -> list[str]:
    """Mark each unit with damaged chunks not done and reset its chunks to the fill value, so that
    ``run`` recomputes exactly those; returns their ids. Damage no unit claims is left (the store
    must then be made anew with ``run --force``). Run it while no job writes the store."""
    index = {u["id"]: i for i, u in enumerate(store_meta(path)["units"])}
    repaired = []
    for unit, damage in report.by_unit().items():
        if unit is None:
            continue
        record = read_sidecar(path, unit) or {}
        reset_chunks(path, record.get("chunks", [d.file for d in damage]))
        set_done(path, index[unit], False)
        files = ", ".join(d.file for d in damage)
        error = f"damaged chunk(s) {files}, reset by `verify --repair`: run the job again to recompute"
        write_sidecar(path, unit, {**record, "status": "failed", "error": error})
        repaired.append(unit)
    return repaired
