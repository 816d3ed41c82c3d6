"""Figures: one or more per analysis present in a store, and an index that links only real files."""

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from builders import build_local_run, job_dict
from PIL import Image

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.plots import Figure, plot_store, write_index
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.tasks.topics import corpus
from ckpt_analysis.zoo.onehot import GDConfig, train_onehot

SMALL: dict[str, Any] = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}


def test_every_analysis_in_a_store_gets_its_figures_and_the_index_shows_them(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10, 20, 30], seed=3, **SMALL)
    analyses = {
        "covariance": {"sites": ["resid_pre", "resid_post"]},
        "hessian": {"k": 2, "trace_probes": 4, "sample_sequences": 8},
        "geometry": {"sample_tokens": 40},
        "diagnostics": {},
        "probes": {"sample_tokens": 60},
        "hessian_basis": {"k": 1, "every": 10, "sample_sequences": 8, "axis": 0},
        "token_loss": {},
        "polca": {"bases": ["hessian", "random"]},
        "clusters": {"trajectories": ["polca", "exact_loss"], "label": "carry", "lag": 10},
    }
    raw = job_dict(run, tmp_path / "s.zarr", analyses=analyses, data={"num_examples": 24})
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job))
    shown = subprocess.run(
        [sys.executable, "-m", "ckpt_analysis", "plot", job.output, "--out", str(tmp_path / "figs")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    expected = {
        "covariance.png",
        "hessian.png",
        "geometry.png",
        "diagnostics_place.png",
        "diagnostics_carry.png",
        "probes_place.png",
        "probes_carry.png",
        "polca_validity.png",
        "index.html",
    }
    assert expected <= names, names
    assert all((tmp_path / "figs" / n).stat().st_size > 5000 for n in names if n.endswith(".png"))
    for name in names - {"index.html"}:  # every figure names what it shows
        assert Image.open(tmp_path / "figs" / name).info["Title"], name
    for name in ("covariance.png", "hessian.png", "geometry.png", "diagnostics_place.png"):  # line plots
        assert int(Image.open(tmp_path / "figs" / name).info["Legends"]) >= 1, name
    linked = re.findall(r'src="([^"]+)"', (tmp_path / "figs" / "index.html").read_text())
    assert sorted(linked) == sorted(n for n in names if n.endswith(".png"))


def test_leading_term_alignment_is_drawn_as_lines_and_as_a_layer_by_step_heatmap(tmp_path: Path) -> None:
    data = {"source": "topics", "num_examples": 16, "seq_len": 10, "seed": 3}
    train_onehot(corpus(16, 10, 6, 3), 6, tmp_path / "run", GDConfig(steps=3, save_every=1))
    raw = job_dict(tmp_path / "run", tmp_path / "lt.zarr", data=data)
    raw["analyses"] = {"corpus_stats": {"vocab_size": 6}, "lt_alignment": {}}
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job))
    figures = plot_store(open_results(job.output), tmp_path / "figs")
    assert [f.path.name for f in figures] == ["leading_terms.png", "leading_terms_heatmap.png"]
    assert all(f.path.stat().st_size > 5000 for f in figures)


def test_the_index_links_only_files_that_exist(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"png")
    figures = [Figure(tmp_path / "a.png", "A <b>"), Figure(tmp_path / "gone.png", "B")]
    index = write_index(figures, tmp_path / "i.html")
    text = index.read_text()
    assert 'src="a.png"' in text and "gone.png" not in text and "A &lt;b&gt;" in text


def test_a_store_without_figures_says_so(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10], **SMALL)
    raw = job_dict(run, tmp_path / "t.zarr")
    raw["analyses"] = {"token_loss": {}}
    job = job_from_dict(raw, base=tmp_path)
    run_job(job)
    assert plot_store(open_results(job.output), tmp_path / "figs") == []
    command = [sys.executable, "-m", "ckpt_analysis", "plot", job.output]
    shown = subprocess.run(command, capture_output=True, text=True, check=False)
    assert shown.returncode == 2 and "holds no analysis that has figures yet" in shown.stderr
