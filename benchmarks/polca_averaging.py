"""Investigation (issue 5): do weight averaging or a bigger basis help POLCA find carry tokens?

The suspected cause of the demo's weak separation is SGD oscillation along sharp directions
dominating each checkpoint's projections. Trailing averages (SWA-style) damp that oscillation:
averaged checkpoint t is the mean of checkpoints t − w + 1 … t (fewer at the start of the run).
For each window w this script writes the averaged run next to the demo's and runs the demo's own
POLCA job on it (Hessian basis, projections, clusters, baselines). A last setting keeps the
demo's run but takes k = 2 vectors per basis checkpoint (62 vectors; the paper has 50). It prints
the carry table of every setting; window 1 is the demo itself.

Run after ``ckpt-analysis demo``: ``python benchmarks/polca_averaging.py demo_out``
(about 3 minutes per setting on 2 cores; finished settings are reused).
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import deque
from pathlib import Path

import torch
from common import CARRY_HEADER, carry_rows, table
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from ckpt_analysis.config import load_job
from ckpt_analysis.run import run_job

WINDOWS = (3, 5)


def average_run(source: Path, target: Path, window: int) -> None:
    """Write ``checkpoint-<step>`` folders holding trailing means of ``window`` checkpoints."""
    folders = sorted(source.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    recent: deque[dict[str, torch.Tensor]] = deque(maxlen=window)
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder)
        recent.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        model.load_state_dict({k: torch.stack([s[k] for s in recent]).mean(dim=0) for k in recent[0]})
        model.save_pretrained(target / folder.name)
        for extra in folder.glob("*token*"):
            shutil.copy(extra, target / folder.name / extra.name)


def run_setting(workdir: Path, name: str, job_text: str, label: str) -> list[list[str]]:
    """Run the demo's POLCA job text with its store under ``workdir/name``; its table rows."""
    text = job_text.replace('output = "polca.zarr"', f'output = "{name}/polca.zarr"')
    (workdir / f"{name}.toml").write_text(text)
    run_job(load_job(workdir / f"{name}.toml"))
    return carry_rows(workdir / name / "polca.zarr", label)


def main(workdir: Path) -> None:
    hf_logging.disable_progress_bar()
    job_text = (workdir / "polca.toml").read_text()
    rows = carry_rows(workdir / "polca.zarr", "demo (k = 1)")
    for window in WINDOWS:
        run = workdir / f"swa{window}" / "run"
        if not run.is_dir():
            average_run(workdir / "run", run, window)
        text = job_text.replace('path = "run"', f'path = "swa{window}/run"')
        rows += run_setting(workdir, f"swa{window}", text, f"SWA window {window}")
    text = re.sub(r"^k = 1 ", "k = 2 ", job_text, flags=re.MULTILINE)
    rows += run_setting(workdir, "k2", text, "k = 2 (62 vectors)")
    header = ["setting", *CARRY_HEADER]
    print(table(header, rows))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out"))
