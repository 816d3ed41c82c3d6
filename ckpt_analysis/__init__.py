"""ckpt-analysis: offline batch analyses of language-model checkpoints into queryable Zarr stores."""

from ckpt_analysis.store import open_results, read

__version__ = "0.1.0"
__all__ = ["__version__", "open_results", "read"]
