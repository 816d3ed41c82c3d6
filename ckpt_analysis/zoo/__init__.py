"""Toy trainers and the demo: fixtures and demonstrations, not the pipeline.

``train`` (tiny GPT-NeoX trainers on the built-in tasks), ``onehot`` (full-batch GD of the
leading-term paper's one-hot attention model, whose model type lives in ``ckpt_analysis.models``),
``standin`` (Pythia's architecture with random weights) and ``demo`` (the offline demo). Only the
CLI imports this package; the pipeline's built-in data sources are ``ckpt_analysis.tasks``.
"""

ONEHOT_DEMO_STEPS = 100
"""Full-batch GD steps of the one-hot model in the demo and in ``train-onehot``: at η = 0.1 its
weights are still on their leading terms (cosines ≥ 0.99), at η = 1 they have drifted
(docs/leading_terms.md). Here, not in ``onehot``, so the CLI reads it without importing torch."""
