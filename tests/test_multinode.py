"""Several machines, on one: two `torchrun --nnodes 2 --nproc_per_node 1 --node-rank 0/1` launches that meet at a
static rendezvous on 127.0.0.1 (gloo), each a "node" with one process, as on two hosts sharing a filesystem.

  resume   2 GRPO steps on two nodes (checkpoint at step 2), then --resume to step 3 with the node ranks swapped:
           the metrics equal a single-node `torchrun --nproc_per_node 2` run of 3 steps
  no share the nodes get different --out folders (a node whose --out is a local disk): one line, exit 2 on
           every node, before any step, nothing written into the second node's folder; the same when the
           second node cannot read --model or reach --simulator
"""
import os
import subprocess
import sys

import pytest
from conftest import closed_port
from test_rlver import CLASSIC, RLVER, ROOT, TIMEOUT, assert_same_metrics, checkpoints, cli_env, metrics, run_cli

FLAGS = ["--algo", "grpo", "--profiles-per-step", "2", "--group-size", "2", "--max-turns", "2", "--max-new-tokens",
         "16", "--micro-batch", "4", "--lr", "1e-2", "--no-think", *CLASSIC]


def two_nodes(args, outs, swap=False, second_node_args=()):
    """Both nodes' torchrun launches, node i with --out outs[i] (swap: the second one launched is node rank 0;
    second_node_args: more flags for node 1). Returns the two finished processes, node rank 0's first."""
    port = closed_port()
    procs = []
    for node, out in enumerate(outs):
        more = list(second_node_args) if node == 1 else []
        rank = 1 - node if swap else node
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node-rank",
             str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}", RLVER, *args, *more, "--out", str(out)],
            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        p.stdout, p.stderr = p.communicate(timeout=TIMEOUT)
    return procs[::-1] if swap else procs


def test_two_nodes_resume_with_ranks_swapped_equals_one_node(tiny_qwen2, tmp_path):
    args = ["--model", tiny_qwen2, *FLAGS, "--save-every", "2"]
    single = tmp_path / "single"
    run_cli([*args, "--steps", "3", "--out", str(single)], nproc=2)
    out = tmp_path / "shared"
    for steps, swap in (("2", False), ("3", True)):
        node0, node1 = two_nodes([*args, "--steps", steps, *(["--resume"] if swap else [])], [out, out], swap)
        assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr[-3000:], node1.stderr[-3000:])
    assert "resumed from" in node0.stdout and "at step 2" in node0.stdout and "2 process(es)" in node0.stdout
    assert checkpoints(out) == [2, 3]
    # both ranks' shards were written and read back: the resumed step equals the single-node one
    assert sorted(os.listdir(out / "checkpoints" / "step_2" / "trainer")) == [".metadata", "__0_0.distcp",
                                                                               "__1_0.distcp"]
    assert_same_metrics(metrics(out), metrics(single), rel=1e-6, abs_=1e-9, what="two nodes, swapped, vs one")


@pytest.mark.parametrize("what", ["out", "model", "simulator"])
def test_a_node_that_sees_other_files_stops_every_node_with_one_line(what, tiny_qwen2, tmp_path):
    outs = [tmp_path / "node0", tmp_path / ("node1" if what == "out" else "node0")]
    second = {"out": [], "model": ["--model", str(tmp_path / "not-on-this-node")],
              "simulator": ["--simulator", f"http://127.0.0.1:{closed_port()}/v1"]}[what]
    node0, node1 = two_nodes(["--model", tiny_qwen2, *FLAGS, "--steps", "2"], outs, second_node_args=second)
    assert node0.returncode != 0 and node1.returncode != 0
    ours = [line for p in (node0, node1) for line in p.stderr.splitlines() if line.startswith("rlver: ")]
    assert len(ours) == 1 and ours[0].startswith("rlver: error: "), ours  # rank 0 prints rank 1's error
    assert {"out": f"rank 1 on {os.uname().nodename} does not see the run folder rank 0 writes (--out {outs[1]} "
                   f"lacks", "model": "not-on-this-node", "simulator": "cannot reach simulator endpoint"}[what] in ours[0]
    assert "rlver: grpo on" not in node0.stdout  # before any step
    assert not (tmp_path / "node1").exists()
