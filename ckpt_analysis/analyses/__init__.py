"""Built-in analyses; importing this package registers them."""

from ckpt_analysis.analyses import (
    clusters,
    covariance,
    diagnostics,
    geometry,
    hessian,
    leading_terms,
    polca,
    probes,
)

__all__ = ["clusters", "covariance", "diagnostics", "geometry", "hessian", "leading_terms", "polca", "probes"]
