"""The ``ckpt-analysis`` command line: run, plan, submit, status, show, read results; it mounts the
toy-model commands and the demo from ``zoo/cli.py``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ckpt_analysis.cli_support import ForceOpt, JobArg, OutputOpt, StoreArg, out, reports_errors
from ckpt_analysis.config import DataSpec, JobSpec
from ckpt_analysis.errors import CkptAnalysisError, DataError
from ckpt_analysis.owners import STALE_AFTER_S
from ckpt_analysis.types import ExecutorKind
from ckpt_analysis.zoo.cli import app as zoo_app

if TYPE_CHECKING:
    from ckpt_analysis.execute import Outcome
    from ckpt_analysis.store import UnitState

log = logging.getLogger(__name__)

app = typer.Typer(
    help=(
        "Study how language models learn, from their saved checkpoints.\n\n"
        "A job file (TOML, see docs/jobs.md) names checkpoints, evaluation data and analyses; "
        "`run` computes every (analysis, checkpoint) unit into one Zarr store that "
        "`ckpt_analysis.open_results(path)` reads back as an xarray Dataset.\n\n"
        "Start with `ckpt-analysis demo`: it trains a tiny model offline and sweeps its checkpoints."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(zoo_app)  # train-onehot, train-arithmetic, train-grammar, demo


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    from rich.logging import RichHandler

    handler: logging.Handler = (
        RichHandler(show_path=False) if sys.stderr.isatty() else logging.StreamHandler()
    )
    if not sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # read when distributed is imported
    # A LocalCluster's nanny warns "Worker process still alive after 4.0 seconds, killing" at every
    # shutdown: workers that hold a loaded model exit slower than its timeout. Nothing is lost.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    for noisy in (
        "distributed",
        "httpx",
        "urllib3",
        "filelock",
        "huggingface_hub",
        "transformers",
        "matplotlib",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _hub_data(spec: JobSpec) -> list[DataSpec]:
    """The job's token sets (``[data]``, ``[sample]``) that name a Hub dataset."""
    from ckpt_analysis.data import hub_dataset_name

    return [d for d in (spec.data, spec.sample) if d is not None and hub_dataset_name(d)]


def _offline_if_cached(spec: JobSpec) -> None:
    """Go offline (``HF_HUB_OFFLINE=1``) when everything the job needs from the Hub (revisions,
    datasets) is cached: online, each load would otherwise retry the network for optional files
    (seconds per revision)."""
    from ckpt_analysis.checkpoints import hub_cache_complete
    from ckpt_analysis.data import hub_dataset_cached

    from_hub = spec.checkpoints.source == "hub"
    hub_data = _hub_data(spec)
    if "HF_HUB_OFFLINE" in os.environ or not (from_hub or hub_data):
        return
    if (not from_hub or hub_cache_complete(spec.checkpoints)) and all(map(hub_dataset_cached, hub_data)):
        log.info("every revision and dataset the job needs is cached: running offline (HF_HUB_OFFLINE=1)")
        os.environ["HF_HUB_OFFLINE"] = "1"


@app.command()
@reports_errors
def run(
    job: JobArg,
    output: OutputOpt = None,
    force: ForceOpt = False,
    executor: Annotated[
        ExecutorKind | None,
        typer.Option(
            help="`local`: Dask LocalCluster (default from the job); `inprocess`: debug; "
            "`slurm`: Dask workers as SLURM jobs (dask-jobqueue; resources from the job's `slurm` table)."
        ),
    ] = None,
    shard: Annotated[int | None, typer.Option(help="Run only units i with i % num_shards == shard.")] = None,
    num_shards: Annotated[int, typer.Option(help="Shard count (SLURM array size).")] = 1,
    stage: Annotated[
        int | None,
        typer.Option(help="Only this dependency stage's units (SLURM arrays; see `submit --dry-run`)."),
    ] = None,
) -> None:
    """Run a job: create its store (or resume it), then compute every unit not yet done.

    Exit code 0 when every unit is done, 1 when some failed (see `status`), 2 on bad input.
    """
    from ckpt_analysis.config import load_job
    from ckpt_analysis.run import run_job

    spec = load_job(job, output=output)
    _offline_if_cached(spec)
    outcomes = run_job(spec, force=force, executor=executor, shard=shard, num_shards=num_shards, stage=stage)
    _report_outcomes(spec.output, outcomes)


def _report_outcomes(store: str, outcomes: list[Outcome]) -> None:
    """Counts per status and each failure's reason; exit code 1 if any unit failed."""
    failed = [o for o in outcomes if not o.ok]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    out.print(
        f"{store}: {counts['done']} computed, {counts['skipped']} already done, {counts['failed']} failed"
    )
    for outcome in failed:
        out.print(f"  [red]failed[/] {outcome.name}: {escape(str(outcome.error))}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
@reports_errors
def watch(
    job: JobArg,
    output: OutputOpt = None,
    until_step: Annotated[
        int | None,
        typer.Option(help="Stop once a checkpoint at or past this step is analysed (the last save)."),
    ] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without a new checkpoint.")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between looks at the run folder.")] = 10.0,
    settle: Annotated[
        float, typer.Option(help="A checkpoint counts once none of its files changed for this many seconds.")
    ] = 5.0,
) -> None:
    """Follow a local run while it trains: analyse each new checkpoint once its files are
    complete, growing the job's store; Ctrl-C stops, and a rerun resumes.

    Only analyses whose units are per checkpoint can be watched (covariance, hessian, geometry,
    diagnostics, probes, token_loss); the others are refused by name: put them in a second job
    to run once training ends. After training, `ckpt-analysis run` on the same job finds the
    store complete. Exit code as for `run`; 130 after Ctrl-C."""
    from ckpt_analysis.config import load_job
    from ckpt_analysis.watch import watch as follow

    spec = load_job(job, output=output)
    try:
        outcomes = follow(
            spec, interval=interval, settle=settle, until_step=until_step, idle_timeout=idle_timeout
        )
    except KeyboardInterrupt:
        Console(stderr=True).print(
            f"stopped; `ckpt-analysis watch {job}` resumes {spec.output}", highlight=False
        )
        raise typer.Exit(130) from None
    _report_outcomes(spec.output, outcomes)


@app.command()
@reports_errors
def plan(
    job: JobArg,
    output: OutputOpt = None,
    force: ForceOpt = False,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Print time, memory and store size per analysis and for the whole sweep; create nothing.",
        ),
    ] = False,
    calibrate: Annotated[
        bool, typer.Option(help="With --estimate: time analyses no finished unit measured yet.")
    ] = True,
) -> None:
    """Validate a job and create its store without computing (SLURM shards need this first).

    With --estimate, nothing is created: per analysis it prints units, time and peak memory per
    unit, store size, and totals for the sweep on this device. Times come from the store's
    finished units when there are some, else from running each analysis's first unit here
    (--no-calibrate skips that). Example: `ckpt-analysis plan jobs/pythia_covariance.toml --estimate`."""
    from ckpt_analysis.config import load_job
    from ckpt_analysis.plan import prepare_store

    spec = load_job(job, output=output)
    _offline_if_cached(spec)
    if estimate:
        _print_estimate(spec, calibrate=calibrate)
        return
    action = prepare_store(spec, force=force)
    out.print(f"{spec.output}: {'store exists, spec unchanged' if action == 'resume' else 'created'}")


def _print_estimate(spec: JobSpec, *, calibrate: bool) -> None:
    from ckpt_analysis.estimate import device_name, estimate, sweep_seconds

    rows = estimate(spec, calibrate=calibrate)
    table = Table(
        "analysis",
        "units",
        "s / unit",
        "of which load",
        "once per worker",
        "unit-hours",
        "peak RSS / unit",
        "peak GPU / unit",
        "store",
        "from",
        title=f"{spec.name} on this device ({device_name(spec.checkpoints.device)})",
    )
    for r in rows:
        table.add_row(
            r.analysis,
            str(r.units),
            _seconds(r.seconds),
            _seconds(r.load_seconds),
            _seconds(r.startup_seconds),
            "—" if r.total_seconds is None else f"{r.total_seconds / 3600:.3g}",
            _size(r.peak_rss_mb, 2**20),
            _size(r.gpu_peak_mb, 2**20),
            _size(r.store_bytes, 1),
            r.source,
        )
    out.print(table)
    hours = sum(r.total_seconds or 0.0 for r in rows) / 3600
    unmeasured = [r.analysis for r in rows if r.seconds is None]
    once = sum(r.startup_seconds or 0.0 for r in rows)
    wall = sweep_seconds(rows, spec.compute.workers) / 3600
    out.print(
        f"sweep: {hours:.3g} unit-hours"
        + (f" (without {', '.join(unmeasured)})" if unmeasured else "")
        + f" + {once:.3g} s once per worker, about {wall:.3g} h on {spec.compute.workers} local "
        f"workers; store {_size(sum(r.store_bytes for r in rows), 1)}",
        highlight=False,
    )


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _size(value: float | None, unit: int) -> str:
    """``value`` × ``unit`` bytes in B … TB."""
    if value is None:
        return "—"
    size = value * unit
    for prefix in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.3g} {prefix}"
        size /= 1000
    return f"{size:.3g} TB"


@app.command()
@reports_errors
def submit(
    job: JobArg,
    output: OutputOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write the sbatch scripts into STORE/slurm/ only.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Return when the last stage has finished.")] = False,
) -> None:
    """Run a job as SLURM array jobs: one array per dependency stage, chained with --dependency.

    Creates (or resumes) the store, then writes STORE/slurm/stage<N>.sbatch for every stage with
    units not yet done and submits them: stage 0 holds units without inputs (e.g. covariances,
    the first Hessian-basis link), later stages the units that read them (the next links, POLCA
    projections, finalize, clusters). Each array task runs `ckpt-analysis run JOB --stage N
    --shard $SLURM_ARRAY_TASK_ID --num-shards T`. Time, memory, CPUs, partition, account, GPUs
    (`gres`) and setup lines come from the job's `slurm` table (docs/jobs.md). Logs go to
    STORE/slurm/logs/. Re-submitting after failures runs only what is not done (let the previous
    submission finish first; `squeue`). Example: `ckpt-analysis submit job.toml --dry-run`, read
    the scripts, then `ckpt-analysis submit job.toml` and `ckpt-analysis status STORE`.
    """
    from ckpt_analysis.config import load_job
    from ckpt_analysis.submit import submit as submit_job

    spec = load_job(job, output=output)
    _offline_if_cached(spec)
    submitted = submit_job(spec, job, dry_run=dry_run, wait=wait)
    table = Table("stage", "analyses", "units", "pending", "array tasks", "job id", title=spec.output)
    for s in submitted:
        table.add_row(
            str(s.number), ", ".join(s.analyses), str(s.units), str(s.pending), str(s.tasks), s.job_id or "-"
        )
    out.print(table if submitted else f"{spec.output}: every unit is done; nothing to submit")
    if wait:
        status(Path(spec.output))


@app.command()
@reports_errors
def resubmit(
    store: StoreArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would run and write the scripts only.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Return when the last stage has finished.")] = False,
) -> None:
    """Submit again only a store's failed, missing and interrupted units, as SLURM arrays.

    Lists each such unit with its reason (as `status` does), then submits the stages that hold
    them with the job the store was created with (written to STORE/slurm/job.toml). Repair the
    cause first (a corrupted checkpoint, a too-small --mem): `status STORE` names it. If the job's
    files have moved since, use `ckpt-analysis submit JOB --output STORE` instead."""
    from ckpt_analysis.submit import resubmit as resubmit_store

    pending, submitted, damaged = resubmit_store(store, dry_run=dry_run, wait=wait)
    if not pending and not damaged:
        out.print(f"{store}: every unit is done; nothing to submit")
        return
    table = Table("unit", "state", "reason", title=f"{store}: {len(pending)} units not done")
    for s in pending:
        table.add_row(s.unit_id, s.state, escape(s.detail))
    out.print(table)
    if damaged:
        out.print(
            f"[red]{len(damaged)} done unit(s) lost chunk files[/] ({', '.join(damaged[:3])}): "
            f"`ckpt-analysis verify {store} --repair` first, then resubmit to recompute them",
            highlight=False,
        )
    for stage in submitted:
        out.print(
            f"stage {stage.number}: {stage.pending} of {stage.units} units in {stage.tasks} array tasks"
            + (f", job {stage.job_id}" if stage.job_id else " (dry run)"),
            highlight=False,
        )
    if wait:
        status(store)


@app.command()
@reports_errors
def status(
    store: StoreArg,
    check: Annotated[
        bool, typer.Option("--verify", help="Also read every chunk and check it (as `verify` does).")
    ] = False,
    stale_after: Annotated[
        float,
        typer.Option(
            help="Seconds without a heartbeat after which a unit whose owner can't be asked "
            "(another host, no SLURM) counts as interrupted."
        ),
    ] = STALE_AFTER_S,
) -> None:
    """Show which units are done, damaged, failed (with the reason), running, interrupted or missing.

    Running means the unit's owner still lives: its process on this host, its SLURM task, or a
    heartbeat within --stale-after seconds where neither can be asked. Interrupted means the owner
    is gone (killed, cancelled, preempted): rerun the job or `resubmit STORE`. Damaged means a
    done unit lost a chunk file (a listing, no reads): `verify STORE --repair`; whether the chunks
    left are intact is what `status --verify` (or `verify STORE`) checks. Exit 1 if a unit failed
    or is damaged (or, with --verify, a chunk is).
    """
    from ckpt_analysis.store import unit_states

    intact = _verify(store, fix=False) if check else True
    states = unit_states(store, stale_after=stale_after)
    table = Table("unit", "state", "detail", title=str(store))
    for s in states:
        table.add_row(s.unit_id, f"[{_COLOUR[s.state]}]{s.state}[/]", escape(s.detail))
    out.print(table)
    counts = _counts(states)
    out.print(", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"] or counts["damaged"] or not intact:
        raise typer.Exit(1)


_COLOUR = {
    "done": "green",
    "damaged": "red",
    "failed": "red",
    "running": "yellow",
    "interrupted": "magenta",
    "missing": "dim",
}


def _counts(states: list[UnitState]) -> dict[str, int]:
    """How many units are in each state, every state listed (zeros too)."""
    from ckpt_analysis.store import STATES

    return {k: sum(s.state == k for s in states) for k in STATES}


@app.command()
@reports_errors
def verify(
    store: StoreArg,
    fix: Annotated[
        bool,
        typer.Option(
            "--repair", help="Mark damaged units not done and reset their chunks, for `run` to recompute."
        ),
    ] = False,
) -> None:
    """Read every chunk of the store and check it: checksums, and every chunk a done unit wrote.

    Lists each damaged unit with its chunk files; exit 1 if any is damaged, 0 if clean. With
    --repair the damaged units are reset so that `ckpt-analysis run JOB` recomputes exactly those.
    Stores written before checksums are checked for missing chunks only (it says so).
    """
    if not _verify(store, fix=fix) and not fix:
        raise typer.Exit(1)


def _verify(store: Path, *, fix: bool) -> bool:
    """Print what ``verify_store`` finds (and repairs, with ``fix``); whether the store was clean."""
    from ckpt_analysis.verify import repair, verify_store

    report = verify_store(store)
    rate = report.bytes / max(report.seconds, 1e-9) / 1e9
    size = f"{report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s ({rate:.2f} GB/s)"
    out.print(f"verified {report.files} chunk files, {size}")
    if report.unchecked_arrays:
        names = ", ".join(report.unchecked_arrays)
        out.print(f"[yellow]no checksums (an older store) in {names}: only missing chunks are found there")
    if report.unrecorded_units:
        out.print(
            f"[yellow]{report.unrecorded_units} done unit(s) predate chunk records: "
            "a missing chunk of theirs cannot be told from an unwritten one"
        )
    for unit, damage in report.by_unit().items():
        owner = unit or "no unit (written when the store was made: recreate it with `run --force`)"
        out.print(f"[red]damaged[/] {escape(owner)}: " + ", ".join(f"{d.file} ({d.problem})" for d in damage))
    if fix and not report.clean:
        repaired = repair(store, report)
        out.print(f"reset {len(repaired)} unit(s); `ckpt-analysis run JOB` recomputes exactly those")
    elif report.clean:
        out.print("[green]clean[/]")
    return report.clean


@app.command()
@reports_errors
def show(store: StoreArg) -> None:
    """Describe a store: job, dimensions, variables and unit progress."""
    from ckpt_analysis.store import open_results, store_meta, unit_states

    ds, meta, states = open_results(store), store_meta(store), unit_states(store)
    out.print(
        f"[bold]{store}[/]  job {meta['job_spec']['name']!r}  spec {meta['spec_hash']}  "
        f"model {meta['model_id']}"
    )
    out.print("dims: " + ", ".join(f"{k}={v}" for k, v in ds.sizes.items()))
    table = Table("variable", "dims", "dtype", "description")
    for name, var in ds.data_vars.items():
        table.add_row(
            str(name), ", ".join(map(str, var.dims)), str(var.dtype), var.attrs.get("description", "")
        )
    out.print(table)
    out.print("units: " + ", ".join(f"{v} {k}" for k, v in _counts(states).items()))


@app.command()
@reports_errors
def clusters(
    store: StoreArg,
    trajectory: Annotated[
        str, typer.Option(help="polca, polca_random, polca_axis, exact_loss, loss_change, fisher")
    ] = "polca",
    vector: Annotated[int | None, typer.Option(help="Basis vector (default: the best-scoring one).")] = None,
    nearest: Annotated[int, typer.Option(help="Tokens shown per cluster, nearest its medoid first.")] = 5,
    window: Annotated[
        str | None,
        typer.Option(help='The window\'s label, e.g. "0-600" or "tau-600" (default: the first stored).'),
    ] = None,
) -> None:
    """Read a vector's clusters: size, breakthrough step, hidden flag, label homogeneity, and the
    tokens nearest each cluster's medoid in context, as context⟨token⟩, in one window of steps
    (docs/polca.md, "Windows")."""
    from ckpt_analysis.report import cluster_examples
    from ckpt_analysis.store import open_results

    ds = open_results(store)
    if "cluster_label" not in ds or trajectory not in ds.trajectory.values.tolist():
        found = ds.trajectory.values.tolist() if "trajectory" in ds else []
        raise CkptAnalysisError(f"{store} has no {trajectory!r} clusters; it has: {found or 'none'}")
    windows = ds.window.values.tolist()
    if window is not None and window not in windows:
        raise CkptAnalysisError(f"{store} has no clusters in the window {window!r}; it has: {windows}")
    index = 0 if window is None else windows.index(window)
    part = ds.isel(window=index).sel(trajectory=trajectory)
    out.print(
        f"window {windows[index]}: checkpoints from step {float(part.cluster_window_start):.0f} to "
        f"{float(part.cluster_window_end):.0f}, τ = {float(part.cluster_tau):.0f}"
    )
    for c in cluster_examples(ds, trajectory, window=index, vector=vector, nearest=nearest):
        hidden = " [hidden breakthrough]" if c.hidden else ""
        out.print(
            f"[bold]vector {c.vector} cluster {c.cluster}[/]: {c.size} tokens, breakthrough at step "
            f"{c.breakthrough:.0f}{hidden}, label homogeneity {c.homogeneity:.2f}"
        )
        for example in c.examples:
            out.print(f"    {escape(example)}", highlight=False)


@app.command()
@reports_errors
def validity(
    store: StoreArg,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw errors and ‖Δθ‖ per interval as a PNG.")
    ] = None,
) -> None:
    """Where POLCA's Taylor terms hold: per checkpoint interval, ‖Δθ‖, the exact change of the mean
    token loss, and each computed second-order variant's relative error in predicting it
    (docs/polca.md, "Per-interval validity"). An error near or above 1 means the expansion does
    not hold over that interval: checkpoints too far apart for the step size. Last, per basis, the
    fraction of the whole run's loss change each variant explains (1 = conserved)."""
    from ckpt_analysis.plots import plot_validity
    from ckpt_analysis.report import (
        chosen_second_order,
        conservation,
        conservation_table,
        validity_rows,
    )
    from ckpt_analysis.store import open_results

    ds = open_results(store)
    if "polca_interval_change" not in ds:
        raise CkptAnalysisError(f"{store} has no POLCA intervals; run a job with [analyses.polca]")
    rows = validity_rows(ds)
    variants = list(rows[0][3])
    title = f"{store}: relative error of each prediction of the interval's loss change"
    table = Table("from step", "‖Δθ‖", "exact change", *variants, title=title)
    for step, norm, change, errors in rows:
        table.add_row(str(step), f"{norm:.3g}", f"{change:+.3g}", *(f"{errors[v]:.2g}" for v in variants))
    out.print(table)
    out.print(conservation_table(conservation(ds), chosen_second_order(store)))
    if plot is not None:
        out.print(f"plot: {plot_validity(ds, plot)}", highlight=False)


@app.command()
@reports_errors
def plot(
    store: StoreArg,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for the PNGs and index.html (default: STORE_plots).")
    ] = None,
) -> None:
    """Draw every analysis present in a store: covariance spectra, Hessian eigenvalues and trace ±
    stderr, intrinsic dimension, diagnostics by label, POLCA validity and clusters, leading-term
    alignment; as PNGs plus one index.html that shows them with captions saying what each axis is.
    Steps spanning decades (Pythia's schedule) get a log step axis; missing values are gaps."""
    from ckpt_analysis.plots import plot_store
    from ckpt_analysis.store import open_results

    target = out_dir or store.with_name(f"{store.name.removesuffix('.zarr')}_plots")
    figures = plot_store(open_results(store), target)
    if not figures:
        raise CkptAnalysisError(f"{store} holds no analysis that has figures yet")
    for figure in figures:
        out.print(str(figure.path), highlight=False)
    out.print(f"open {target / 'index.html'}", highlight=False)


@app.command()
@reports_errors
def alignment(
    store: StoreArg,
    plot: Annotated[Path | None, typer.Option(help="Also write the score trajectories as a PNG.")] = None,
) -> None:
    """Read leading-term alignment (lt_score, docs/leading_terms.md): per comparison and layer, the score
    at
    step 0 (the null), its range over later steps, the final score, and the final score against
    statistics of the token-shuffled corpus (the other null)."""
    from ckpt_analysis.plots import plot_alignment
    from ckpt_analysis.report import alignment_table
    from ckpt_analysis.store import open_results

    ds = open_results(store)
    if "lt_score" not in ds:
        raise CkptAnalysisError(f"{store} has no lt_score; run a job with [analyses.lt_alignment]")
    table = Table("comparison", "layer", "step 0", "lowest", "highest", "final", "final, shuffled")
    for r in alignment_table(ds):
        values = (r.step0, r.lowest, r.highest, r.final, r.shuffled_final)
        table.add_row(r.comparison, str(r.layer), *(f"{v:.4f}" for v in values))
    out.print(table)
    if plot is not None:
        out.print(f"plot: {plot_alignment({store.stem: ds}, plot)}", highlight=False)


@app.command()
@reports_errors
def prefetch(job: JobArg) -> None:
    """Download a job's Hub revisions (config, weights, tokenizer) into checkpoints.cache_dir, and
    a Hub dataset named by data.path into data.cache_dir, for a later offline run.

    With HF_HUB_OFFLINE=1 nothing is downloaded: it reports what is cached and what is missing.
    Exit code 1 when anything is missing.
    """
    from ckpt_analysis.checkpoints import prefetch as fetch
    from ckpt_analysis.config import load_job

    spec = load_job(job)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    hub_data = _hub_data(spec)
    missing: list[str] = []
    if spec.checkpoints.source == "hub" or not hub_data:
        cached, missing = fetch(spec.checkpoints, offline=offline)
        where = " (offline)" if offline else ""
        out.print(f"{len(cached)} revisions cached, {len(missing)} missing{where}")
    for data in hub_data:
        missing += _prefetch_dataset(data)
    if missing:
        out.print("missing: " + ", ".join(missing), highlight=False)
        raise typer.Exit(1)


def _prefetch_dataset(data: DataSpec) -> list[str]:
    """Fetch (offline: look up) one Hub dataset; returns ``[its name]`` when it is missing."""
    from ckpt_analysis.data import datasets_cache, load_hub_dataset

    try:
        load_hub_dataset(data)
    except DataError as exc:
        out.print(f"dataset {data.path} missing: {exc}", highlight=False)
        return [str(data.path)]
    out.print(f"dataset {data.path} cached in {datasets_cache(data)}", highlight=False)
    return []
