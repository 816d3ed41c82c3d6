"""ckpt-analysis: offline batch analyses of language-model checkpoints into queryable Zarr stores."""

from typing import TYPE_CHECKING, Any

from ckpt_analysis.store import open_results, read

if TYPE_CHECKING:
    from ckpt_analysis.curvature import curvature_operator

__version__ = "0.1.0"
__all__ = ["__version__", "curvature_operator", "open_results", "read"]


def __getattr__(name: str) -> Any:
    """``curvature_operator`` on first use: reading a store never imports torch."""
    if name == "curvature_operator":
        from ckpt_analysis.curvature import curvature_operator

        return curvature_operator
    raise AttributeError(f"module 'ckpt_analysis' has no attribute {name!r}")
