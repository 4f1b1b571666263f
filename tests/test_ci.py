""".ci/gpu, the prepared GPU acceptance script, run the way the suite can: `.ci/gpu --cpu` (every section at tiny
shapes on the CPU), so a change that breaks the script fails here and not on the day a GPU is lent."""
import os
import subprocess
import sys

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
