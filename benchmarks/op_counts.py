"""Aten ops a covariance unit dispatches per batch beyond the bare forward (docs/benchmarks.md).

Run: ``python benchmarks/op_counts.py`` (seconds). Tiny random GPTNeoX (hidden 32), batches of 4
sequences; counts are the difference between units over 4 and 2 batches, so once-per-unit work
cancels; "data-dependent" counts boolean indexing, ``.item()`` and ``bool(tensor)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from builders import BATCH, ops_per_batch, tiny_model, unit_context
from common import table
from covariance import SITE_SETS

from ckpt_analysis.analyses.covariance import Covariance, CovarianceParams
from ckpt_analysis.registry import Unit


def main() -> None:
    rows = []
    unit = Unit("covariance", "step=0", checkpoint=0)
    for gram in ("float64", "float32"):
        for layers in (2, 6):
            model = tiny_model(num_layers=layers)
            for sites in SITE_SETS:
                analysis = Covariance(CovarianceParams(sites=sites, gram_dtype=gram))  # type: ignore[arg-type]
                ops, dependent = ops_per_batch(
                    model,
                    lambda d, a=analysis, m=model: a.compute(unit, unit_context(m, d, {}, batch_size=BATCH)),
                )
                per = ops / (len(sites) * layers)
                rows.append([gram, str(layers), str(len(sites)), f"{ops:.0f}", f"{per:.2f}", str(dependent)])
    headers = ["gram dtype", "layers", "sites", "extra ops per batch", "per site-layer", "data-dependent"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
