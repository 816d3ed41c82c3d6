"""Every option of every analysis is in the options table of the page that documents it."""

import dataclasses
import re
from pathlib import Path

import pytest

from ckpt_analysis.registry import get_analysis, registered

DOCS = Path(__file__).parents[1] / "docs"
PAGE = {
    "clusters": "polca.md",
    "corpus_stats": "leading_terms.md",
    "covariance": "covariance.md",
    "diagnostics": "diagnostics.md",
    "geometry": "geometry.md",
    "hessian": "hessian.md",
    "hessian_basis": "hessian.md",
    "lt_alignment": "leading_terms.md",
    "polca": "polca.md",
    "probes": "probes.md",
    "token_cov": "leading_terms.md",
    "token_loss": "polca.md",
}
"""Each analysis's documentation page (docs/adding_an_analysis.md says to add the new one here)."""


def _table_keys(page: str) -> set[str]:
    """Every `name` in the first cell of a table row of ``page``."""
    rows = re.findall(r"^\|([^|\n]*)\|", (DOCS / page).read_text(), re.M)
    return {key for cell in rows for key in re.findall(r"`([a-z_0-9]+)`", cell)}


def test_every_built_in_analysis_has_a_documentation_page() -> None:
    built_in = {n for n in registered() if get_analysis(n).__module__.startswith("ckpt_analysis.analyses.")}
    assert built_in == set(PAGE)  # other tests register analyses of their own


@pytest.mark.parametrize("name", sorted(PAGE))
def test_every_option_appears_in_its_pages_options_table(name: str) -> None:
    fields = {f.name for f in dataclasses.fields(get_analysis(name).params_type)}
    assert fields - _table_keys(PAGE[name]) == set(), f"docs/{PAGE[name]} lacks these {name} options"
