"""Model types the pipeline loads beside transformers' own (registered with its Auto classes)."""
