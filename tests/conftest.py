"""Shared helpers and fixtures: the repository root, a closed port, tiny real checkpoints (random weights,
trained tokenizer) built once per test session."""
import os
import socket
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import make_tiny_checkpoint  # noqa: E402


def closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, read, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """model_type -> folder of a tiny HF checkpoint: qwen2 (tied, qkv bias), llama (llama3 rope), qwen3 (q/k norm)."""
    root = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_checkpoint(str(root / mt), mt, seed=i) for i, mt in enumerate(["qwen2", "llama", "qwen3"])}


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_checkpoints):
    return tiny_checkpoints["qwen2"]


@pytest.fixture
def one_thread():
    """In-process torch work on one thread: with 2 threads on a 2-core box that is busy with our subprocesses
    (or anything else) every op waits for a descheduled worker thread, ~5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
