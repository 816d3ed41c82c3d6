"""A unit's chunks, written to temporary files and renamed into place together (docs/results.md,
"Completion, provenance, concurrency").

zarr encodes every chunk (checksum included) as usual, but into the unit's staging folder
``_units/<unit>.staging/`` (one flat file per chunk); only once every block is written are the
files renamed onto their places in the store. A rename needs no space, so a failure part-way
through the writes, a full disk included, leaves none of the unit's blocks visible: the folder is
removed, and a folder left by a killed process is swept by the next run
(:func:`~ckpt_analysis.store.sweep_temp_files`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from zarr.storage import LocalStore

from ckpt_analysis.errors import StoreError
from ckpt_analysis.store import chunk_files, staging_folder, still_there

if TYPE_CHECKING:
    import zarr
    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import Buffer, BufferPrototype

    from ckpt_analysis.registry import Write

_METADATA = "zarr.json"


class _StagingStore(LocalStore):
    """The store's folder, except that chunk files are written to (and read back first from)
    ``staging``, a folder relative to the root; metadata is read from the store itself.

    zarr writes a block's chunks concurrently and, when one fails, raises while the others are
    still being written; :meth:`close_writes` refuses further writes and waits for those, so the
    staging folder can then be removed for good.
    """

    def __init__(self, root: str, staging: str) -> None:
        super().__init__(root)
        self.staging = staging
        self._writing = threading.Condition()
        self._active = 0
        self._closed = False

    def _staged(self, key: str) -> str | None:
        return None if key.endswith(_METADATA) else f"{self.staging}/{staged_name(key)}"

    async def set(self, key: str, value: Buffer) -> None:
        with self._writing:
            if self._closed:
                raise StoreError(f"{self.staging}: the unit's writes were discarded")
            self._active += 1
        try:
            staged = self._staged(key)
            if staged is None:
                await super().set(key, value)
            else:  # straight into the file: a torn staged file is never renamed into place
                await asyncio.to_thread(_write_file, self.root / staged, value)
        finally:
            with self._writing:
                self._active -= 1
                self._writing.notify_all()

    def close_writes(self, timeout: float = 60.0) -> None:
        """Refuse every later write, and wait (up to ``timeout`` s) for those under way to end."""
        with self._writing:
            self._closed = True
            self._writing.wait_for(lambda: self._active == 0, timeout=timeout)

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        staged = self._staged(key)
        found = None if staged is None else await super().get(staged, prototype, byte_range)
        return found if found is not None else await super().get(key, prototype, byte_range)


def _write_file(path: Path, value: Buffer) -> None:
    path.parent.mkdir(exist_ok=True)
    with path.open("wb") as handle:
        handle.write(value.as_buffer_like())


def staged_name(key: str) -> str:
    """A chunk key as one flat file name (``act_cov%2Fc%2F3%2F0``): the staging folder holds no
    tree of its own to create and remove."""
    return quote(key, safe="")


class StagedWrites:
    """Stage one unit's blocks, then :meth:`commit` them all at once (or :meth:`discard` them).

    Not thread-safe: one instance per unit being computed, used by one thread. Blocks that cover
    part of a chunk are merged with what is already staged, else with the stored chunk.
    """

    def __init__(self, path: str | Path, unit_id: str) -> None:
        self.root = os.fspath(path)
        self.folder = staging_folder(path, unit_id)
        self.files: list[str] = []
        """Chunk files covered so far, relative to the store (``act_cov/c/3/0/1``)."""
        self._store = _StagingStore(self.root, self.folder.relative_to(self.root).as_posix())
        self._arrays: dict[str, zarr.Array[Any]] = {}

    def write(self, write: Write) -> None:
        """Stage one block (``store[name][index] = values``)."""
        import zarr

        still_there(self.root)
        self.files += [f for f in chunk_files(self.root, write) if f not in self.files]
        if write.name not in self._arrays:
            array = zarr.open_array(store=self._store, path=write.name, mode="r+")
            # every chunk is written, fill-valued ones too (docs/results.md, "Integrity")
            self._arrays[write.name] = array.with_config({"write_empty_chunks": True})
        self._arrays[write.name][write.index] = write.values

    def commit(self) -> None:
        """Rename every staged file onto its place: folders first, then the renames alone.

        A rename that fails part-way leaves some files in place: the caller resets :attr:`files`.
        """
        still_there(self.root)
        for folder in {Path(self.root, file).parent for file in self.files}:
            folder.mkdir(parents=True, exist_ok=True)
        for file in self.files:
            os.replace(self.folder / staged_name(file), Path(self.root, file))
        self.discard()

    def discard(self) -> None:
        """Stop staging (writes still under way end first), and remove the staging folder."""
        self._store.close_writes()
        shutil.rmtree(self.folder, ignore_errors=True)
