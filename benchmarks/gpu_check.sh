#!/usr/bin/env bash
# The GPU checks in one script (docs/benchmarks.md, "On a GPU"): the card, the CUDA-marked tests
# (the batch loops' sync check and batch_size = "auto" among them), covariance against bare
# forwards, per-unit cost on the Pythia 70M, 410M and 1.4B stand-ins, the estimate checked on an
# 8-revision 70M sweep, and a timed prefix of the paper-scale POLCA setting.
# Each step has its own time limit and writes its log under OUT (default: gpu_out); a step that
# fails or runs out of time does not stop the next.
# Run: bash benchmarks/gpu_check.sh [PAPER_STEPS]   (about 9 minutes on one H200 before the
# 410M, 1.4B and sweep steps were added: budget 15; not yet run with them); ONLY="cuda_tests
# paper_prefix" runs only the named steps (paper_units, the prefix's summary, runs with paper_prefix).
# The POLCA paper's protocol within a budget (docs/polca.md, "One budgeted command"), one call of
# at most 10 minutes:  ONLY="cuda_tests paper_budget" bash benchmarks/gpu_check.sh
# (PAPER_BUDGET seconds, default 420; PAPER_SETTING=paper-tiny runs its tiny twin, as the tests do
# on the CPU; WORK is where runs and stores go, default /tmp).
set -uo pipefail
out=${OUT:-gpu_out}
work=${WORK:-/tmp}
steps=${1:-1000}
only=${ONLY:-cuda_tests covariance_standin pythia_standin standin_410m standin_1.4b estimate_sweep paper_prefix}
[[ " $only " == *" paper_prefix "* ]] && only="$only paper_units"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, record rc and time
    local name=$1 limit=$2
    shift 2
    [[ " $only " == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: rc=$? in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

nvidia-smi >"$out/card.txt" 2>&1
python3 -c 'import torch, transformers, huggingface_hub, zarr, dask, distributed, xarray, hdbscan, datasets
for m in (torch, transformers, huggingface_hub, zarr, dask, distributed, xarray, hdbscan, datasets):
    print(m.__name__, m.__version__)
print(torch.cuda.get_device_name(0))' >>"$out/card.txt" 2>&1
step cuda_tests 120 python3 -m pytest -m cuda -p no:cacheprovider -q tests/test_cuda.py tests/test_batching.py
step covariance_standin 120 python3 benchmarks/covariance.py --standin --device cuda
step pythia_standin 140 python3 benchmarks/pythia_standin.py /tmp/standin --device cuda --hessian
step standin_410m 150 python3 benchmarks/pythia_standin.py /tmp/standin410 --size 410m --device cuda --hessian
step standin_1.4b 240 python3 benchmarks/pythia_standin.py /tmp/standin1400 --size 1.4b --device cuda --sequences 64
step estimate_sweep 180 python3 benchmarks/pythia_standin.py /tmp/standin --device cuda --sweep
step paper_budget "${BUDGET_LIMIT:-450}" python3 benchmarks/polca_scale_up.py "$work/paper_budget" \
    "--${PAPER_SETTING:-paper}" --budget "${PAPER_BUDGET:-420}"
cp "$work"/paper_budget/*/report.md "$work"/paper_budget/*/*.png "$out"/ 2>/dev/null
step paper_prefix "${PAPER_LIMIT:-240}" python3 benchmarks/polca_scale_up.py /tmp/paper --paper --only paper --steps "$steps"
# Whatever the prefix finished, measured per unit (from its sidecars), even if it ran out of time.
step paper_units 30 python3 -c "
from ckpt_analysis.config import load_job
from ckpt_analysis.estimate import estimate
for e in estimate(load_job('/tmp/paper/paper/polca.toml'), calibrate=False):
    print(e.analysis, e.units, e.seconds, e.gpu_peak_mb)"
if [[ " $only " == *" paper_prefix "* ]]; then
    tar czf "$out/paper_units.tar.gz" -C /tmp/paper/paper polca.toml polca.zarr/_units 2>/dev/null
    du -sh /tmp/paper/paper/run /tmp/paper/paper/polca.zarr >>"$out/summary.txt" 2>&1
fi
