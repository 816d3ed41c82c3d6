"""What a block of torch code asks of the device, counted: aten ops, and host-device waits on CUDA
(docs/benchmarks.md, "Ops per batch")."""

from __future__ import annotations

import warnings
from collections import Counter
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DATA_DEPENDENT = frozenset(
    {"aten.nonzero", "aten.masked_select", "aten._local_scalar_dense", "aten.is_nonzero", "aten.index(bool)"}
)
"""Ops whose output shape or value the host must wait for on a GPU: boolean indexing, ``.item()``,
``bool(tensor)``."""


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside ``with OpCounter() as ops:`` by name (``aten.mm``),
    views included; boolean-mask indexing is counted as ``aten.index(bool)``.

    Each op runs as it would without the counter. Ops that run inside another op's kernel are not
    seen, so one ``aten.index`` is one op however it is implemented.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = str(func.overloadpacket)
        if name == "aten.index" and any(_is_mask(i) for i in args[1]):
            name = "aten.index(bool)"
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def data_dependent(self) -> int:
        """How many of the counted ops are in :data:`DATA_DEPENDENT`."""
        return sum(n for name, n in self.ops.items() if name in DATA_DEPENDENT)


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


class SyncCounter:
    """Counts the host-device synchronisations inside ``with SyncCounter() as syncs:``, as CUDA's
    sync debug mode reports them (``torch.cuda.set_sync_debug_mode("warn")``); not thread-safe:
    it sets process-wide state."""

    def __init__(self) -> None:
        self._catch = warnings.catch_warnings(record=True)
        self._caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> SyncCounter:
        self._caught = self._catch.__enter__() or []
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(kind, error, trace)

    @property
    def total(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self._caught)
