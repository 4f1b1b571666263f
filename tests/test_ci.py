""".ci/gpu, the prepared GPU acceptance script, run the way the suite can: `.ci/gpu --cpu` (every section at tiny
shapes on the CPU), so a change that breaks the script fails here and not on the day a GPU is lent."""
import importlib.machinery
import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_gpu_script_passes_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "gpu"), "--cpu", "--tmp", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith(("| section",
                                                                                                    "| ---"))]
    sections = {line.split(" | ")[0][2:] for line in rows}
    assert sections == {"logits", "cache", "compiled", "decode", "grpo", "ppo", "no-fsdp", "fsdp-compile"}
    assert all(line.split(" | ")[3] == "ok" for line in rows), p.stdout


def ci_gpu():
    """.ci/gpu as a module (its file name has no .py; importing it runs no section)."""
    loader = importlib.machinery.SourceFileLoader("ci_gpu", os.path.join(ROOT, ".ci", "gpu"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("ci_gpu", loader))
    loader.exec_module(module)
    return module


def weight_elements(model, model_type):
    """Every weight a forward reads in full, counted from the config by hand (not from the module)."""
    c = model.config
    matrices = c.num_hidden_layers * (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads)
                                      * c.head_dim + c.num_attention_heads * c.head_dim * c.hidden_size
                                      + 3 * c.hidden_size * c.intermediate_size)
    norms = c.hidden_size * (2 * c.num_hidden_layers + 1)
    qkv_bias = c.num_hidden_layers * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    head = c.vocab_size * c.hidden_size  # read by the lm_head each step; the input embedding is not (B rows)
    return matrices + norms + (qkv_bias if model_type == "qwen2" else 0) + head


def test_decode_floor_counts_weights_once_and_the_kv_cache(tiny_checkpoints):
    from model import load_model

    rows, context = 3, 10
    for model_type, tied in (("qwen2", True), ("llama", False)):
        model = load_model(tiny_checkpoints[model_type])
        c = model.config
        assert c.tie_word_embeddings == tied
        # the fp32 weights once, and k and v of every layer for context + 1 positions (the step's own) per row
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * rows * (context + 1)
        floor = ci_gpu().decode_floor(model, rows, context, bytes_per_s=1e9)
        assert floor == pytest.approx((4 * weight_elements(model, model_type) + kv) / 1e9)


def test_gpu_bandwidth_matches_the_device_name_most_specific_first():
    bandwidth = ci_gpu().datasheet_bandwidth
    assert bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12  # SXM
    assert bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert bandwidth("NVIDIA H200") == 4.8e12
    assert bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert bandwidth("NVIDIA GeForce RTX 4090") is None  # then measured
