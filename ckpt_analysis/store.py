"""The results store (docs/results.md): one Zarr v3 group per job, created once, filled chunk by chunk.

Concurrency rules (zarr-python 3.1 facts, ``docs/environment.md``): the planner creates every
array and attribute once, in one process, into a temporary folder that is renamed into place
(``watch`` later grows the step axis in place, between runs: :func:`grow_store`); each unit
owns whole chunks (extent 1 along its unit axis, no shards); workers never write attributes or
resize; a unit is complete only when its ``unit_done`` chunk is 1, written last;
per-unit provenance goes to sidecar JSON files under ``_units/``, each replaced atomically.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from ckpt_analysis.errors import StoreError
from ckpt_analysis.owners import STALE_AFTER_S, Liveness, describe

if TYPE_CHECKING:
    import xarray as xr
    import zarr

    from ckpt_analysis.registry import Variable, Write
    from ckpt_analysis.types import Columns

ATTR_KEY = "ckpt_analysis"
UNITS_DIR = "_units"
DONE = "unit_done"


def open_results(path: str | Path, *, chunks: dict[str, int] | None = None, check: bool = True) -> xr.Dataset:
    """Open a results store as a lazy, labelled :class:`xarray.Dataset`.

    Parameters
    ----------
    path
        The store: a job's ``output`` folder.
    chunks
        ``None`` (default): lazily indexed arrays without dask, fastest for ``.sel`` of a few
        matrices. ``{}``: dask arrays on the store's chunks, for reductions over many steps.
    check
        Refuse a store whose done units lost chunk files (they would read as NaN): one stat per
        chunk a done unit wrote (8 ms for the demo's 1,300). Damaged *contents* raise when read,
        whatever ``check`` says (docs/results.md, "Integrity").

    Returns
    -------
    xarray.Dataset
        Every variable of ``docs/results.md`` with its named dimensions and the ``step``,
        ``revision``, ``tokens_seen``, ``layer``, ``site``, … coordinates. Nothing is read until
        values are asked for.

    Raises
    ------
    StoreError
        ``path`` does not exist, is a file, or is a folder that is not a results store; or, with
        ``check``, a done unit's chunk file is missing (the message names ``verify --repair``).

    Notes
    -----
    Safe to call while a job is still writing, from any process: every unit owns whole chunks and
    marks itself done last, so a reader sees each unit either finished or unwritten, never torn.
    Unwritten units read as the fill value, NaN for floats and −1 for counts; ``unit_done``
    says which units are complete. The dataset reflects the chunks present when each value is
    read, so re-read (or re-open) to see units finished since.

    Examples
    --------
    >>> ds = open_results("demo_out/covariance.zarr")  # doctest: +SKIP
    >>> ds.act_cov.sel(step=300, site="resid_post", layer=1)  # doctest: +SKIP
    """
    import xarray as xr

    require_store(path)
    if check and (Path(path) / UNITS_DIR).is_dir():
        _refuse_missing(path)
    with _quiet_consolidated():
        ds: xr.Dataset = xr.open_zarr(str(path), consolidated=True, chunks=chunks)
    return ds


_NUMERIC = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64"}


def read(path: str | Path, name: str, **labels: Any) -> np.ndarray:
    """Read one labelled block of a variable, fast, without xarray.

    Parameters
    ----------
    path
        The store.
    name
        A variable, e.g. ``"act_cov"``.
    **labels
        One value per dimension to select: a coordinate value where the dimension has a
        coordinate (``step=1000``, ``site="resid_post"``), else an integer position (``layer=3``).
        Every dimension not named must span whole chunks.

    Returns
    -------
    numpy.ndarray
        The block over the dimensions not named, e.g. a ``(dim, dim_b)`` covariance.

    Raises
    ------
    StoreError
        ``path`` is not a results store, ``name`` is not one of its variables, a label is not in
        its coordinate, or an unnamed dimension spans several chunks (the message lists them).

    Notes
    -----
    Uncompressed chunks are read straight from their files (≈ 10× faster than zarr-python for one
    small block); other arrays go through zarr. Like :func:`open_results`, safe while a job
    writes: an unwritten block reads as the fill value (NaN for floats).

    Examples
    --------
    >>> read("demo_out/covariance.zarr", "act_cov", step=300, site="resid_post", layer=1)  # doctest: +SKIP
    """
    root = os.fspath(path)
    try:  # one stat on the hot path; the full check only to word the error
        token = os.stat(os.path.join(root, "zarr.json")).st_mtime_ns  # changes when a store is replaced
    except OSError:
        require_store(path)
        raise
    meta = _array_meta(root, name, token)
    dims, shape, chunks = meta["dims"], meta["shape"], meta["chunks"]
    unknown = sorted(set(labels) - set(dims))
    if unknown:
        raise StoreError(f"{name} has no dimension(s) {unknown}; its dimensions: {', '.join(dims)}")
    where = {d: _position(root, d, labels[d], token) for d in labels}
    split = [d for d in dims if d not in where and chunks[dims.index(d)] != shape[dims.index(d)]]
    if split:
        raise StoreError(f"{name}: also select {split}; they span several chunks")
    key = [where.get(d, 0) // chunks[i] for i, d in enumerate(dims)]
    block = _read_chunk(root, name, meta, key)
    inner = tuple(where[d] % chunks[i] if d in where else slice(None) for i, d in enumerate(dims))
    return block[inner]


@cache
def _array_meta(path: str, name: str, _token: int) -> dict[str, Any]:
    file = Path(path) / name / "zarr.json"
    if not file.is_file():
        raise StoreError(f"{path} has no variable {name!r}")
    raw = json.loads(file.read_text())
    codecs = [c["name"] for c in raw["codecs"]]
    encoding = raw["chunk_key_encoding"]
    direct = (
        codecs in (["bytes"], ["bytes", "crc32c"])
        and encoding["name"] == "default"
        and raw["data_type"] in _NUMERIC
    )
    endian = raw["codecs"][0].get("configuration", {}).get("endian", "little") if direct else "little"
    return {
        "dims": tuple(raw["dimension_names"]),
        "shape": tuple(raw["shape"]),
        "chunks": tuple(raw["chunk_grid"]["configuration"]["chunk_shape"]),
        "dtype": np.dtype(raw["data_type"] if direct else "O").newbyteorder(
            "<" if endian == "little" else ">"
        ),
        "fill": raw["fill_value"],
        "direct": direct,
        "checksum": "crc32c" in codecs,
        "prefix": os.path.join(path, name, "c"),
        "separator": encoding.get("configuration", {}).get("separator", "/"),
    }


def _read_chunk(path: str, name: str, meta: dict[str, Any], key: list[int]) -> np.ndarray:
    chunks = meta["chunks"]
    relative = "c" + meta["separator"] + meta["separator"].join(map(str, key))
    if not meta["direct"]:
        import zarr

        region = tuple(slice(k * c, (k + 1) * c) for k, c in zip(key, chunks, strict=True))
        try:
            return np.asarray(zarr.open_array(path, path=name, mode="r")[region])
        except ValueError as exc:  # zarr's checksum mismatch
            raise StoreError(f"{path}/{name}/{relative}: {exc}; {_REPAIR.format(store=path)}") from exc
    file = os.path.join(path, name, relative)
    try:
        raw = np.fromfile(file, dtype=np.uint8)
    except FileNotFoundError:
        if meta["checksum"] and f"{name}/{relative}" in chunk_owners(done_records(path)):
            raise StoreError(
                f"{file} is missing but its unit is done: the store is damaged; {_REPAIR.format(store=path)}"
            ) from None
        fill = np.nan if meta["fill"] == "NaN" else meta["fill"]
        return np.full(chunks, fill, dtype=meta["dtype"])
    if meta["checksum"] and not checksum_ok(raw):
        raise StoreError(f"{file} fails its checksum: the store is damaged; {_REPAIR.format(store=path)}")
    payload = raw[:-4] if meta["checksum"] else raw
    block: np.ndarray = payload.view(meta["dtype"]).reshape(chunks)
    return block


_REPAIR = "run `ckpt-analysis verify {store} --repair`, then `ckpt-analysis run` to recompute it"


def checksum_ok(raw: np.ndarray) -> bool:
    """Whether a chunk's bytes (``uint8``) end in the crc32c of the rest (zarr's ``crc32c`` codec:
    4 bytes, little-endian)."""
    import google_crc32c

    return len(raw) >= 4 and google_crc32c.value(raw[:-4]) == int.from_bytes(raw[-4:].tobytes(), "little")


def done_records(path: str | Path) -> list[dict[str, Any]]:
    """The sidecars of the units that are done: marker set and sidecar saying so."""
    done = {u["id"] for u, flag in zip(store_meta(path)["units"], done_flags(path), strict=True) if flag}
    records = (json.loads(f.read_text()) for f in (Path(path) / UNITS_DIR).glob("*.json"))
    return [r for r in records if r.get("status") == "done" and r.get("unit") in done]


def chunk_owners(records: list[dict[str, Any]]) -> dict[str, str]:
    """Chunk file (relative to the store) → the unit whose record lists it (units written before
    chunk records were kept list none)."""
    return {file: r["unit"] for r in records for file in r.get("chunks", [])}


def missing_chunks(path: str | Path, owners: dict[str, str]) -> dict[str, list[str]]:
    """Units whose listed chunk files are gone (docs/results.md, "Integrity"): unit → its missing files."""
    missing: dict[str, list[str]] = {}
    for file, unit in owners.items():
        if not os.path.exists(os.path.join(path, file)):
            missing.setdefault(unit, []).append(file)
    return missing


def _refuse_missing(path: str | Path) -> None:
    """One StoreError naming the done units whose chunks are gone, instead of reading them as fill."""
    missing = missing_chunks(path, chunk_owners(done_records(path)))
    if missing:
        units = "; ".join(f"{u}: {', '.join(files[:3])}" for u, files in list(missing.items())[:3])
        raise StoreError(
            f"{path} is damaged: {len(missing)} done unit(s) lost chunk files ({units}); "
            f"{_REPAIR.format(store=path)} (or open_results(..., check=False) to read the rest)"
        )


def _position(path: str, dim: str, label: Any, token: int) -> int:
    positions = _coordinate_positions(path, dim, token)
    if positions is None:
        return int(label)
    if label not in positions:
        raise StoreError(f"{dim} = {label!r} is not in the store; it has {list(positions)[:8]}")
    return positions[label]


@cache
def _coordinate_positions(path: str, dim: str, _token: int) -> dict[Any, int] | None:
    if not (Path(path) / dim / "zarr.json").is_file():
        return None
    return {v: i for i, v in enumerate(read_array(path, dim).tolist())}


@contextmanager
def _quiet_consolidated() -> Iterator[None]:
    """Silence zarr's note that consolidated metadata is not in the v3 spec (we rely on it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def require_store(path: str | Path) -> None:
    """Raise one clear StoreError unless ``path`` is a results store (the only such test)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a results store (a job's output folder)")
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is a folder but not a results store")


def store_meta(path: str | Path) -> dict[str, Any]:
    """The toolkit's root attributes (spec, hash, versions, units) of a store."""
    import zarr

    require_store(path)
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    if ATTR_KEY not in attrs:
        raise StoreError(f"{path} is a Zarr store but not a ckpt-analysis results store")
    meta = attrs[ATTR_KEY]
    assert isinstance(meta, dict)
    return meta


SPEC_PARTS = {
    "settings": "the job's analysis settings",
    "checkpoints": "the checkpoints (their selection or weight files)",
    "data": "the data content (data, sample or tokenizer files)",
}
"""The spec hash's parts (:meth:`~ckpt_analysis.config.JobSpec.spec_parts`), as a refusal names them."""


def check_output(
    path: str | Path,
    spec_hash: str,
    *,
    force: bool,
    parts: dict[str, str] | None = None,
    version: str | None = None,
) -> Literal["create", "resume", "replace"]:
    """Decide what to do with the output path, refusing files and other jobs' stores.

    A refusal of another spec names what changed when the store recorded its ``parts``, and the
    toolkit ``version`` that wrote it when that differs from this one.
    """
    path = Path(path)
    if path.is_file():
        raise StoreError(f"output path {path} is a file, not a results store")
    if not path.exists():
        return "create"
    if not (path / "zarr.json").is_file():
        if any(path.iterdir()):
            raise StoreError(
                f"output path {path} is a non-empty folder that is not a results store; "
                "remove it or choose another output"
            )
        return "replace"
    meta = store_meta(path)
    found = meta.get("spec_hash")
    if found == spec_hash:
        return "resume"
    if not force:
        raise StoreError(
            f"{path} holds results of a different job spec (hash {found}, this job {spec_hash}): "
            f"{_what_changed(meta, parts, version)}; use another output path or --force to replace it"
        )
    return "replace"


def _what_changed(meta: dict[str, Any], parts: dict[str, str] | None, version: str | None) -> str:
    stored = meta.get("spec_parts")
    changed = [SPEC_PARTS[k] for k in SPEC_PARTS if parts and stored and stored.get(k) != parts.get(k)]
    what = f"{' and '.join(changed)} changed since it was made" if changed else "the job differs"
    written_by = meta.get("versions", {}).get("ckpt-analysis")
    if version and written_by and written_by != version:
        what += f" (it was written by ckpt-analysis {written_by}, this is {version})"
    return what


def create_store(
    path: str | Path,
    *,
    variables: list[Variable],
    coords: Columns,
    tables: Columns,
    meta: dict[str, Any],
    replace: bool,
) -> None:
    """Create the whole store once, atomically (temp folder + rename). Single process only."""
    import dask.array as da
    import xarray as xr
    import zarr
    from zarr.codecs import Crc32cCodec

    path = Path(path)
    data_vars: dict[str, Any] = {n: (dims, values) for n, (dims, values) in tables.items()}
    # docs/results.md, "Integrity": every data array carries a crc32c checksum per chunk
    encoding: dict[str, dict[str, Any]] = {n: {"compressors": [Crc32cCodec()]} for n in [*tables, *coords]}
    for var in variables:
        lazy = da.full(var.shape, var.fill, dtype=var.dtype, chunks=var.chunks)
        data_vars[var.name] = (var.dims, lazy, {"description": var.doc} if var.doc else {})
        encoding[var.name] = {"chunks": var.chunks, "fill_value": var.fill, "compressors": [Crc32cCodec()]}
    ds = xr.Dataset(data_vars, coords={n: (dims, v) for n, (dims, v) in coords.items()})
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a planner killed mid-create (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        ds.to_zarr(str(tmp), mode="w-", compute=False, zarr_format=3, encoding=encoding, consolidated=False)
        zarr.open_group(str(tmp), mode="r+").attrs.update({ATTR_KEY: meta})
        with _quiet_consolidated():
            zarr.consolidate_metadata(str(tmp))
        (tmp / UNITS_DIR).mkdir()
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
        _array.cache_clear()
    except OSError as exc:
        raise StoreError(f"cannot create the store {path}: {exc.strerror or exc}") from exc
    finally:  # zarr may still be renaming a file inside on a full disk: remove what is left
        shutil.rmtree(tmp, ignore_errors=True)


def grow_store(
    path: str | Path, *, shapes: dict[str, tuple[int, ...]], columns: Columns, meta: dict[str, Any]
) -> None:
    """Grow arrays to ``shapes`` along their first axis (new chunks read as the fill value), write
    ``columns`` whole, then replace the root attributes with ``meta``, last.

    For ``watch``, holding the creation lock while no unit runs. Every step is idempotent, so a
    growth killed midway is finished by the next one: until ``meta`` is written the store still
    describes its old checkpoints and units, whose chunks are untouched.
    """
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    for name, shape in shapes.items():
        array = group[name]
        assert isinstance(array, zarr.Array)
        if array.shape != shape:
            array.resize(shape)
    for name, (_, values) in columns.items():
        array = group[name]
        assert isinstance(array, zarr.Array)
        if array.shape != values.shape:
            array.resize(values.shape)
        array[...] = values
    group.attrs.update({ATTR_KEY: meta})
    with _quiet_consolidated(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Object at {UNITS_DIR} is not recognized")  # sidecars
        zarr.consolidate_metadata(str(path))
    _array.cache_clear()


@cache
def _array(path: str, name: str) -> zarr.Array[Any]:
    """An array opened for writing; chunks equal to the fill value are written too, so a done
    unit's chunks are all on disk and a missing one is damage (docs/results.md, "Integrity")."""
    import zarr

    return zarr.open_array(path, path=name, mode="r+").with_config({"write_empty_chunks": True})


def chunk_files(path: str | Path, write: Write) -> list[str]:
    """The chunk files ``write`` covers, relative to the store (``act_cov/c/3/0/1``)."""
    array = _array(str(path), write.name)
    index = (*write.index, *[slice(None)] * (array.ndim - len(write.index)))
    ranges = []
    for i, size, chunk in zip(index, array.shape, array.chunks, strict=True):
        start, stop, _ = (slice(i, i + 1) if isinstance(i, int) else i).indices(size)
        ranges.append(range(start // chunk, -(-stop // chunk)))
    return [f"{write.name}/{array.metadata.encode_chunk_key(key)}" for key in itertools.product(*ranges)]


def reset_chunks(path: str | Path, files: Iterable[str]) -> None:
    """Remove chunk files (they read as the fill value again); absent ones are skipped."""
    for file in files:
        Path(path, file).unlink(missing_ok=True)


def set_done(path: str | Path, index: int, done: bool) -> None:
    """Set a unit's completion marker (its own chunk of ``unit_done``)."""
    still_there(path)
    _array(str(path), DONE)[index] = np.int8(done)


def still_there(path: str | Path) -> None:
    """Refuse to write into a store removed during the run: zarr would recreate a half-store."""
    if not (Path(path) / "zarr.json").is_file():
        raise StoreError(f"the store {path} was removed during the run; nothing more is written to it")


@contextmanager
def creation_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on creating the store at ``path`` (``.<name>.lock`` beside it).

    Two runs planning one output take turns: the second finds the store made and resumes it.
    Advisory ``flock`` locks hold on local disks and on NFS/Lustre mounts with locking enabled.
    The lock file lives only while the lock is held: it is removed on the way out, so a creation
    that fails (a full disk included) leaves no lock behind, as a refused job leaves none.
    Folders it made for the store are removed too when no store came of it.
    """
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        handle = _locked(lock)
    except OSError as exc:
        raise StoreError(f"cannot create the store {path}: {exc.strerror or exc}") from exc
    try:
        with handle:
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)  # still held: whoever waits on it retries on a new file
    finally:
        for folder in made if not path.exists() else []:  # deepest first; a non-empty one stays
            with suppress(OSError):
                folder.rmdir()


def _locked(lock: Path) -> IO[str]:
    """``lock`` opened and flock'ed exclusively; retried while the file we locked was unlinked by
    its previous holder (:func:`creation_lock` removes it), so two holders never lock two files."""
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


@contextmanager
def unit_lock(path: str | Path, unit_id: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on one unit (``_units/<unit>.lock``) while it is computed.

    A concurrent run reaching the same unit waits here, then finds it done and skips it, so
    concurrent runs on one store never compute a unit twice (docs/results.md, "Concurrent runs").
    """
    with lock_file(path, unit_id).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def lock_file(path: str | Path, unit_id: str) -> Path:
    """A unit's lock file, ``_units/<unit>.lock``; its modification time is the running unit's
    heartbeat (:func:`~ckpt_analysis.owners.heartbeat`)."""
    return _sidecar_path(path, unit_id).with_suffix(".lock")


def staging_folder(path: str | Path, unit_id: str) -> Path:
    """Where a unit's chunks are staged before they are renamed into place (:mod:`~ckpt_analysis.staging`)."""
    return _sidecar_path(path, unit_id).with_suffix(".staging")


def _lock_held(lock: Path) -> bool:
    """Whether some process holds ``lock`` (a unit's lock file) now; an absent file is not held."""
    try:
        handle = lock.open("r")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def check_writable(path: str | Path) -> None:
    """Raise one clear StoreError if this process cannot write the store's chunks and sidecars."""
    for folder in (Path(path), Path(path) / UNITS_DIR, Path(path) / DONE):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write to the store {path}: {folder} is read-only for this user")


def read_array(path: str | Path, name: str, rows: slice = slice(None)) -> np.ndarray:
    """An array of the store (``rows`` of its first axis; all by default), read with zarr.

    Rows past the end are clipped as in numpy, so a slice wholly past it gives an empty array.
    """
    import zarr

    return np.asarray(zarr.open_array(str(path), path=name, mode="r")[rows])


def done_flags(path: str | Path) -> np.ndarray:
    """Completion markers of every unit, as booleans."""
    return read_array(path, DONE).astype(bool)


def _sidecar_path(path: str | Path, unit_id: str) -> Path:
    return Path(path) / UNITS_DIR / (unit_id.replace("/", "__") + ".json")


def write_sidecar(path: str | Path, unit_id: str, record: dict[str, Any]) -> None:
    """Replace a unit's provenance record atomically (write to a temp file, then rename)."""
    target = _sidecar_path(path, unit_id)
    tmp = target.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_temp_files(path: str | Path) -> int:
    """Remove sidecar temp files and staging folders left by a killed or failed unit; returns how many.

    One is removed only when its unit's lock is free, so a unit being written now by another run
    keeps its own.
    """
    removed = 0
    units = Path(path) / UNITS_DIR
    for tmp in [*units.glob("*.tmp-*"), *units.glob("*.staging")]:
        with tmp.with_suffix(".lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def read_sidecar(path: str | Path, unit_id: str) -> dict[str, Any] | None:
    target = _sidecar_path(path, unit_id)
    return json.loads(target.read_text()) if target.is_file() else None


@dataclass(frozen=True)
class UnitState:
    """A unit's state as ``status`` reports it (docs/results.md, "Running or interrupted")."""

    index: int
    unit_id: str
    state: UnitStateName
    detail: str = ""


UnitStateName = Literal["done", "damaged", "failed", "running", "interrupted", "missing"]
STATES: tuple[UnitStateName, ...] = get_args(UnitStateName)
"""Every state, in the order ``status`` counts them."""


def unit_states(path: str | Path, *, stale_after: float = STALE_AFTER_S) -> list[UnitState]:
    """Every unit's state: done; damaged (done, but a chunk file it wrote is gone: one ``stat``
    per chunk, no reads); failed (with the reason); running, or interrupted when its owner is
    gone (:class:`~ckpt_analysis.owners.Liveness`; ``stale_after``: seconds without a heartbeat
    after which an owner that cannot be asked counts as gone); missing."""
    units = [u["id"] for u in store_meta(path)["units"]]
    done = done_flags(path).tolist()
    records = [read_sidecar(path, unit) or {} for unit in units]
    finished = [r for r, d in zip(records, done, strict=True) if d and r.get("status") == "done"]
    lost = missing_chunks(path, chunk_owners(finished))
    running = [r for r, d in zip(records, done, strict=True) if not d and r.get("status") == "running"]
    liveness = Liveness(running, stale_after=stale_after)
    return [
        _state(path, i, unit, record, done=done[i], lost=lost.get(unit), liveness=liveness)
        for i, (unit, record) in enumerate(zip(units, records, strict=True))
    ]


def _state(
    path: str | Path,
    index: int,
    unit: str,
    record: dict[str, Any],
    *,
    done: bool,
    lost: list[str] | None,
    liveness: Liveness,
) -> UnitState:
    status = record.get("status")
    if done and lost:
        files = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
        return UnitState(index, unit, "damaged", f"lost chunk file(s) {files}; {_REPAIR.format(store=path)}")
    if done:
        return UnitState(index, unit, "done", f"{record.get('wall_s', 0):.1f}s")
    if status == "failed":
        return UnitState(index, unit, "failed", str(record.get("error", "")))
    if status != "running":
        return UnitState(index, unit, "missing")
    lock = lock_file(path, unit)
    beat = lock.stat().st_mtime if lock.exists() else None
    gone = liveness.gone(record, beat, held=lambda: _lock_held(lock))
    if gone is None:
        since = f", heartbeat {time.time() - beat:.0f} s ago" if beat else ""
        return UnitState(index, unit, "running", f"on {describe(record)}{since}")
    way_out = f"rerun the job (`ckpt-analysis run JOB`) or `ckpt-analysis resubmit {path}`"
    return UnitState(index, unit, "interrupted", f"{gone} (was {describe(record)}); {way_out}")
