"""Built-in analyses; importing this package registers them."""

from ckpt_analysis.analyses import covariance

__all__ = ["covariance"]
