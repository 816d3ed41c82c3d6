"""Who runs a unit, and whether they still live (docs/results.md, "Running or interrupted").

A running unit's sidecar names its owner (:func:`owner`): host, pid and the process's start
time, and the SLURM job and array task when there is one. While it computes, the owner refreshes
a heartbeat, the modification time of the unit's lock file (:func:`heartbeat`). A reader decides
whether the owner is gone (:class:`Liveness`), in this order:

1. the same host: the process is gone (or its pid now belongs to a later process);
2. a SLURM job: ``squeue`` no longer lists it as running (one call for every record asked about);
3. otherwise: no heartbeat for ``stale_after`` seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

HEARTBEAT_S = 30.0
"""How often a running unit refreshes its heartbeat."""

STALE_AFTER_S = 600.0
"""A running unit whose owner cannot be asked (another host, no SLURM) is interrupted after this
long without a heartbeat: 20 missed beats."""

_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
_LIVE_SLURM_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING"}


def owner() -> dict[str, Any]:
    """This process as a unit's owner: host, pid, its start time, and SLURM ids where set."""
    pid = os.getpid()
    slurm = {var: os.environ[var] for var in _SLURM_ENV if var in os.environ}
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid), **slurm}


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), which
    tells a live owner from a later process given the same pid; ``None`` where there is no
    ``/proc`` or the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _process_alive(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` on this host lives and is the one that started at ``started``."""
    if Path("/proc").is_dir():
        now = _process_start(pid)
        return now is not None and (started is None or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def heartbeat(file: Path, *, every: float = HEARTBEAT_S) -> Iterator[None]:
    """Refresh ``file``'s modification time now and every ``every`` seconds until the block ends.

    A daemon thread does it, so a unit computing in C (torch releases the GIL) still beats; a
    failed touch (a full or vanished disk) is skipped, never raised.
    """
    stop = threading.Event()

    def beat() -> None:
        while True:
            with suppress(OSError):
                os.utime(file)
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat {file.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class Liveness:
    """Decides, for records of running units, whether their owners are gone.

    One instance per listing: SLURM is asked once, for every job id among ``records``.
    """

    records: list[dict[str, Any]]
    stale_after: float = STALE_AFTER_S
    host: str = field(default_factory=socket.gethostname)

    def gone(
        self, record: dict[str, Any], last_beat: float | None, *, held: Callable[[], bool]
    ) -> str | None:
        """Why the owner of ``record`` is gone (one clause), or ``None`` while it may still run.

        ``last_beat`` is the unit's last heartbeat (a time stamp); ``held`` says whether the unit's
        lock is held now, asked only on the owner's own host (flock is not trusted across nodes).
        """
        where = f"host {record.get('host')} pid {record.get('pid')}"
        if record.get("host") == self.host and isinstance(record.get("pid"), int):
            if not _process_alive(record["pid"], record.get("pid_start")):
                return f"its process ({where}) is gone"
            return None if held() else f"its process ({where}) no longer holds the unit's lock"
        job = record.get("SLURM_JOB_ID")
        if job is not None and self._slurm_running is not None:
            task = _slurm_name(record)
            return None if str(job) in self._slurm_running else f"SLURM {task} is no longer running"
        beat = max(last_beat or 0.0, float(record.get("started", 0.0)))
        silent = time.time() - beat
        if silent > self.stale_after:
            return f"no heartbeat from {where} for {silent:.0f} s (over {self.stale_after:.0f} s)"
        return None

    @cached_property
    def _slurm_running(self) -> set[str] | None:
        """Job ids among the records that SLURM lists as running; ``None`` if SLURM can't be asked."""
        jobs = sorted({str(r["SLURM_JOB_ID"]) for r in self.records if r.get("SLURM_JOB_ID") is not None})
        if not jobs:
            return set()
        return slurm_running(jobs)


def slurm_running(jobs: list[str]) -> set[str] | None:
    """Of ``jobs`` (SLURM job ids, an array task's own id included), those SLURM lists as running,
    or ``None`` where ``squeue`` is missing or fails (then a heartbeat decides)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    cmd = [squeue, "-h", "-o", "%A %T", "--jobs", ",".join(jobs)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:  # every id unknown (long finished) is an error to squeue
        return set() if "Invalid job id" in result.stderr else None
    rows = (line.split() for line in result.stdout.splitlines())
    return {row[0] for row in rows if len(row) == 2 and row[1] in _LIVE_SLURM_STATES}


def _slurm_name(record: dict[str, Any]) -> str:
    array, task = record.get("SLURM_ARRAY_JOB_ID"), record.get("SLURM_ARRAY_TASK_ID")
    return f"job {array}_{task}" if array and task else f"job {record['SLURM_JOB_ID']}"


def describe(record: dict[str, Any]) -> str:
    """The owner of a record in words: ``host H pid P (SLURM job A_T), started HH:MM:SS``."""
    slurm = f" (SLURM {_slurm_name(record)})" if record.get("SLURM_JOB_ID") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0.0))))
    return f"host {record.get('host')} pid {record.get('pid')}{slurm}, started {started}"
