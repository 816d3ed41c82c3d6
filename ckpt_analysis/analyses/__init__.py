"""Built-in analyses; importing this package registers them."""

from ckpt_analysis.analyses import covariance, hessian, polca

__all__ = ["covariance", "hessian", "polca"]
