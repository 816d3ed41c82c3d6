"""Built-in synthetic tasks for demos and tests."""
