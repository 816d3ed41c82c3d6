"""Shared fixtures: offline Hugging Face, a tiny local run and a fake Hub cache built once per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # read once when huggingface_hub is imported: set it first
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
from builders import build_fake_hub, build_local_run

RUN_STEPS = [0, 10, 20, 30, 40, 50]
HUB_REPO = "tiny-org/tiny-neox"
HUB_REVISIONS = ["step0", "step1", "step2", "step4", "step1000"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local run of six ``checkpoint-<N>`` folders (read-only for tests)."""
    return build_local_run(tmp_path_factory.mktemp("run"), RUN_STEPS)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake Hub cache holding HUB_REPO at HUB_REVISIONS."""
    return build_fake_hub(tmp_path_factory.mktemp("hub"), HUB_REPO, HUB_REVISIONS)
