"""``python -m ckpt_analysis`` runs the CLI."""

from ckpt_analysis.cli import app

app()
