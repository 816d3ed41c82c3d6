"""Toy models, built-in tasks and the demo: fixtures and demonstrations, not the pipeline.

``tasks`` (3-digit addition, the synthetic topic corpus), ``train`` (a tiny GPT-NeoX trainer on
addition), ``onehot`` (the leading-term paper's one-hot attention model and its GD trainer) and
``demo`` (the offline demo). The pipeline imports only ``tasks`` (built-in data sources) and
``onehot.register`` (so the one-hot model type loads like any other); nothing here is imported by
``config``, ``store``, ``plan``, ``run`` or ``execute``.
"""

ONEHOT_DEMO_STEPS = 100
"""Full-batch GD steps of the one-hot model in the demo and in ``train-onehot``: at η = 0.1 its
weights are still on their leading terms (cosines ≥ 0.99), at η = 1 they have drifted
(docs/leading_terms.md). Here, not in ``onehot``, so the CLI reads it without importing torch."""
