"""Shared fixtures: tiny real checkpoints (random weights, trained tokenizer) built once per test session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """model_type -> folder of a tiny HF checkpoint: qwen2 (tied, qkv bias), llama (llama3 rope), qwen3 (q/k norm)."""
    root = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_checkpoint(str(root / mt), mt, seed=i) for i, mt in enumerate(["qwen2", "llama", "qwen3"])}


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_checkpoints):
    return tiny_checkpoints["qwen2"]
