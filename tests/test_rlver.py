"""rlver.py, the training driver, end to end through its real CLI (subprocesses, no mocks):

  learning     GRPO and PPO under torchrun (2 CPU processes, FSDP2) raise the mean reward on the rules simulator
  resume       SIGKILL after a checkpoint, or SIGTERM mid-run, then --resume: the same metrics as an unbroken run
  FSDP == 1    `torchrun --nproc_per_node 2` and `python rlver.py --no-fsdp` agree on the first step's metrics
  checkpoint   <ckpt>/hf loads in transformers with the same logits as model.load_model, and training moved it
  errors       bad flags, numbers, paths, checkpoints, an old --out, an incompatible --resume: exit code 2 and
               one "rlver: error:" line, before any model is loaded, the files in --out untouched
  simulators   real HTTP servers: unparseable answers stop the run (last step saved, resumable), a hanging one
               hits the turn deadline, a second Ctrl-C exits 130 at once, 429 waits Retry-After; a torn
               checkpoint (step_N.tmp with DONE) is skipped by --resume
  token carry  rollout.rollout (in-process): the carried ids are the chat template of the dialogue, and the
               policy mask selects exactly the sampled tokens
  in process   rlver's setup, rollout, scoring and update one by one: the first optimizer step at a temperature
               (ratio 1, log-probs against a plain forward, the loss goes down), a stream per dialogue, a
               training step against numbers worked out from its dialogues
  demo         `python rlver.py` with no --model makes a tiny model and trains

Expensive runs are module-scoped fixtures shared by the assertions that read them. Budget: ~2 minutes on a
2-core CPU box (every subprocess runs with OMP_NUM_THREADS=1 so two torchrun ranks do not oversubscribe).
"""
import contextlib
import copy
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest
from conftest import ROOT, closed_port
import torch

import model as lm
import rlver
import rollout as ro
import simulator as sim

RLVER = os.path.join(ROOT, "rlver.py")
TIMEOUT = 300  # seconds per subprocess: generous for a loaded CI box; a hang fails instead of blocking

# Settings that learn within a few steps on the tiny random model (hidden 64, 2 layers) against the rules
# simulator: 3 turns of up to 24 tokens, 8 profiles x 4 rollouts per step, a toy-sized learning rate.
# Every profile starts at emotion 50 (the flat_profiles fixture): the built-in profiles start at 20..60, and
# which of them a step draws would move the step's mean reward by more than the first steps of learning do.
# These tests were tuned on our classic rules and optimiser settings (which differ from the official defaults,
# see README): CLASSIC pins them.
CLASSIC = ["--protocol", "classic", "--kl-coef", "1e-3", "--entropy-coef", "0", "--weight-decay", "0",
           "--value-clip", "0.2", "--warmup-ratio", "0"]
LEARN = ["--profiles-per-step", "8", "--group-size", "4", "--max-turns", "3", "--max-new-tokens", "24",
         "--micro-batch", "16", "--no-think", "--save-every", "100", *CLASSIC]
GRPO_LEARN = ["--algo", "grpo", "--lr", "5e-2", "--steps", "10", "--eval-every", "5"]
# PPO learns more slowly: its critic starts random, so early advantages are mostly noise. Four optimizer
# steps per rollout batch (--mini-batches 4, same compute as one) and a critic as fast as the policy help.
PPO_LEARN = ["--algo", "ppo", "--lr", "2e-2", "--critic-lr", "2e-2", "--mini-batches", "4", "--steps", "16"]

# Small and fast: the resume runs and the PPO FSDP comparison.
SMALL = ["--profiles-per-step", "4", "--max-turns", "2", "--max-new-tokens", "16", "--no-think", *CLASSIC]

# Metrics that depend on wall-clock time, not on the computation.
TIMING = {"time_rollout", "time_generate", "time_simulator", "time_update", "gen_tokens_per_s",
          "decode_steps", "active_rows"}  # (how many rows share a decode step depends on when answers arrive)


# ---------------------------------------------------------------------------------------------------------
# helpers


def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a test runner inside torchrun must not make our subprocesses join its group
    return env


def command(args, nproc=None):
    if nproc:  # = `torchrun --standalone --nproc_per_node N rlver.py ...`; --standalone picks a free port
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                RLVER, *args]
    return [sys.executable, RLVER, *args]


def run_cli(args, nproc=None, check=True, timeout=TIMEOUT):
    return run_clis((args, nproc), check=check, timeout=timeout)[0]


def run_clis(*runs, check=True, timeout=TIMEOUT):
    """Independent runs, each (args, nproc), started at once (most of a short run is imports and setup, which
    overlap); returns their finished processes (returncode, stdout, stderr) in order."""
    procs = [subprocess.Popen(command(args, nproc), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, nproc in runs]
    try:
        for p in procs:
            p.stdout, p.stderr = p.communicate(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (args, _), p in zip(runs, procs):
        if check and p.returncode != 0:
            raise AssertionError(f"rlver.py {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                                 f"\n--- stderr\n{p.stderr[-4000:]}")
    return procs


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoints(out):
    return [int(os.path.basename(p).split("_")[1]) for p in rlver.checkpoint_dirs(str(out))]


def assert_same_metrics(got, want, keys=None, rel=0.0, abs_=0.0, what=""):
    """Every (non-timing) metric of `got` equals `want`'s, to rel/abs tolerance; lists of steps or one step."""
    got, want = (got, want) if isinstance(got, list) else ([got], [want])
    assert [m["step"] for m in got] == [m["step"] for m in want], what
    for g, w in zip(got, want):
        ks = keys or sorted(set(w) - TIMING)
        assert set(ks) <= set(g), f"{what}: metrics missing {set(ks) - set(g)}"
        bad = {k: (g[k], w[k]) for k in ks if g[k] != pytest.approx(w[k], rel=rel, abs=abs_)}
        assert not bad, f"{what}: step {w['step']}: metrics differ (got, want): {bad}"


def wait_for(predicate, proc, timeout=TIMEOUT, poll=0.02):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"rlver.py exited {proc.returncode} before the test could interrupt it\n"
                                 f"{out[-3000:]}\n{err[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run to reach the interruption point")
        time.sleep(poll)


def n_lines(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def flat_profiles(tmp_path_factory):
    """The built-in training profiles with every initial_emotion set to 50 (see LEARN)."""
    path = tmp_path_factory.mktemp("profiles") / "flat.jsonl"
    with open(os.path.join(ROOT, "prompts", "profiles_train.jsonl")) as src, open(path, "w") as dst:
        for line in src:
            if line.strip():
                dst.write(json.dumps({**json.loads(line), "initial_emotion": 50}) + "\n")
    assert {p.initial_emotion for p in sim.load_profiles(path)} == {50}
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# 1-2. Learning under torchrun (2 processes, FSDP2 on CPU/gloo)


@pytest.fixture(scope="module")
def grpo_fsdp(tiny_qwen2, flat_profiles, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grpo_fsdp"))
    tests = os.path.join(out, "five-test-profiles.jsonl")  # the periodic eval plays every --test-profiles profile
    with open(os.path.join(ROOT, "prompts", "profiles_test.jsonl")) as src, open(tests, "w") as dst:
        dst.writelines([line for line in src if line.strip()][:5])
    run_cli(["--model", tiny_qwen2, "--out", out, "--train-profiles", flat_profiles, "--test-profiles", tests, *LEARN,
             *GRPO_LEARN], nproc=2)
    return out


@pytest.fixture(scope="module")
def ppo_fsdp(tiny_qwen2, flat_profiles, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ppo_fsdp"))
    run_cli(["--model", tiny_qwen2, "--out", out, "--train-profiles", flat_profiles, *LEARN, *PPO_LEARN], nproc=2)
    return out


def mean(xs):
    return sum(xs) / len(xs)


def test_grpo_torchrun_reward_rises(grpo_fsdp):
    m = metrics(grpo_fsdp)
    assert [x["step"] for x in m] == list(range(1, 11))
    rewards = [x["reward"] for x in m]
    # Observed (seeds 0-3): steps 1-3 average 0.505-0.51 (every user starts at 50 and a random policy barely
    # moves them; the step mean's noise is ~0.005), steps 8-10 average 0.64-0.69. A margin of 0.08 leaves
    # room for different float rounding on other CPUs; a run that does not learn stays at ~0.51.
    assert mean(rewards[-3:]) > mean(rewards[:3]) + 0.08, rewards
    assert m[-1]["kl_ref"] > 0 and m[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # moved away from the reference
    assert 10 in checkpoints(grpo_fsdp)  # the final step is always saved
    with open(os.path.join(grpo_fsdp, "config.json")) as f:
        config = json.load(f)
    assert config["world_size"] == 2 and config["algo"] == "grpo" and config["group_size"] == 4


def test_torchrun_periodic_eval_plays_every_test_profile_in_order(grpo_fsdp):
    # --eval-every 5, 5 test profiles: the ranks play 2 and 3 of them greedily, rank 0 reports
    test_ids = [p.id for p in sim.builtin_profiles("test")[:5]]
    for step in (5, 10):
        with open(os.path.join(grpo_fsdp, "eval", f"step_{step}", "transcripts.jsonl")) as f:
            assert [json.loads(line)["profile_id"] for line in f] == test_ids, f"eval at step {step}"


def test_ppo_torchrun_reward_rises(ppo_fsdp):
    m = metrics(ppo_fsdp)
    assert [x["step"] for x in m] == list(range(1, 17))
    rewards = [x["reward"] for x in m]
    # Observed (seeds 0-3): steps 1-4 average 0.51, steps 13-16 average 0.58-0.64 (gap 0.068-0.127); without
    # learning the two windows agree to ~0.01.
    assert mean(rewards[-4:]) > mean(rewards[:4]) + 0.04, rewards
    # the critic learns the returns: its squared error falls well below where the random value head began
    assert mean([x["value_error"] for x in m[-4:]]) < 0.5 * m[0]["value_error"], [x["value_error"] for x in m]


# ---------------------------------------------------------------------------------------------------------
# 4. FSDP over 2 processes == one process without FSDP (first step)
#
# They must agree, up to float summation order: rollouts are seeded per (seed, step, global dialogue index)
# and model.generate draws each row from its own generator, so the two layouts sample the same dialogues;
# GRPO groups never straddle ranks; PPO whitens advantages with all-reduced moments; every loss is
# normalised by the GLOBAL token count (all-reduced, / world because FSDP averages gradients over ranks),
# so sum-over-ranks-and-micro-batches of the gradients is the single-process gradient, however the batch
# is cut (the single process runs 2 micro-batches where each rank runs 1 here). The update is one AdamW
# step on the same gradient, so the second step's rollouts match too (checked for GRPO).
#
# Not compared: statistics that are per-micro-batch means by construction (adv_std/min/max,
# explained_var, ratio_mean/approx_kl that are 1/0 up to padding-layout rounding) and timings.
# Both sides run the same update code, so a bug in it would be on both: the single process has its own
# independent reference in test_training_step_against_numbers_worked_from_its_dialogues (loss and returns
# worked out from the dialogues) and test_first_optimizer_step_at_a_temperature_has_ratio_1 (log-probs
# against a plain forward); the rollouts in test_rollout.py's check_engine_logits.
COMPARED = ["reward", "reward_std", "turns", "policy_tokens", "seq_len", "loss", "policy_loss", "entropy",
            "kl_ref", "grad_norm", "clip_frac", "lr"]
PPO_COMPARED = COMPARED + ["value_loss", "value_error", "values_mean", "returns_mean", "critic_grad_norm"]


def test_grpo_fsdp_equals_single_process(grpo_fsdp, tiny_qwen2, flat_profiles, tmp_path):
    out = str(tmp_path / "single")
    args = ["--model", tiny_qwen2, "--train-profiles", flat_profiles, *LEARN, *GRPO_LEARN]
    run_cli([*args, "--out", out, "--no-fsdp", "--steps", "2"])  # later flags win: 2 steps, not 10
    single, fsdp = metrics(out), metrics(grpo_fsdp)[:2]
    assert abs(fsdp[0]["loss"]) > 1e-3  # a real value to compare (token-mean of group advantages != 0)
    assert_same_metrics(single[0], fsdp[0], COMPARED + ["kl"], rel=1e-5, abs_=1e-7, what="grpo --no-fsdp vs torchrun")
    # Step 2 starts from one AdamW step, whose first update is ~lr * sign(gradient): gradient entries that are
    # ~0 turn their rounding noise into visible weight differences (observed up to ~1e-5 relative in step 2).
    assert_same_metrics(single[1], fsdp[1], COMPARED + ["kl"], rel=1e-4, abs_=1e-6, what="grpo step 2")


def mixed_profiles(tmp_path):
    """The first 4 built-in training profiles starting at 99, 98, 20, 50: the first two soon reach 100 and end,
    so dialogues differ in length."""
    records = [json.loads(line) for line in open(os.path.join(ROOT, "prompts", "profiles_train.jsonl"))][:4]
    for record, emotion in zip(records, [99, 98, 20, 50]):
        record["initial_emotion"] = emotion
    profiles = tmp_path / "mixed.jsonl"
    profiles.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(profiles)


def test_ppo_fsdp_equals_single_process(tiny_qwen2, tmp_path):
    # per rank 8 dialogues = 1 micro-batch of 8; the single process cuts its 16 into 2 micro-batches.
    # seq-mean-token-mean over dialogues of different lengths (mixed_profiles): under token-mean PPO's
    # first-step policy loss is -mean(whitened advantages) = 0 on both sides whatever the layout; averaged
    # per sequence it is a real value, and it needs the global sequence count. (Both sides share the
    # update's code; its independent references are test_ppo.py's hand-worked aggregation and
    # micro-batches-with-the-global-count-equal-the-full-batch.)
    args = ["--model", tiny_qwen2, "--train-profiles", mixed_profiles(tmp_path), *SMALL, "--algo", "ppo",
            "--group-size", "4", "--micro-batch", "8", "--lr", "1e-2", "--critic-lr", "1e-2", "--steps", "1",
            "--loss-agg", "seq-mean-token-mean"]
    run_clis(([*args, "--out", str(tmp_path / "fsdp")], 2),
             ([*args, "--out", str(tmp_path / "single"), "--no-fsdp"], None))
    fsdp, single = metrics(tmp_path / "fsdp"), metrics(tmp_path / "single")
    assert abs(fsdp[0]["policy_loss"]) > 1e-3 and fsdp[0]["value_loss"] > 1e-3 and fsdp[0]["grad_norm"] > 1e-3
    assert_same_metrics(single, fsdp, PPO_COMPARED, rel=1e-5, abs_=1e-7, what="ppo: --no-fsdp vs torchrun")


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_think_history_strip_fsdp_equals_single_process(algo, tiny_qwen2, tmp_path):
    # --think-history strip trains one sample per policy turn. Profiles starting at 98-99 soon reach 100 and
    # end, the others run 3 turns, and step 1 puts both 98-99 profiles on rank 0: the ranks hold different
    # numbers of turn samples, rank 0 is padded with empty ones, and the step must equal the single process.
    assert rlver.step_profiles(4, 4, 0, seed=0)[:2] == [0, 1]  # rank 0's share of step 1
    args = ["--model", tiny_qwen2, "--algo", algo, "--think", "--think-history", "strip", "--train-profiles",
            mixed_profiles(tmp_path), "--profiles-per-step", "4", "--group-size", "2", "--max-turns", "3",
            "--max-new-tokens", "16", "--micro-batch", "4", "--steps", "1", "--protocol", "classic", "--kl-coef", "0",
            "--lr", "1e-2", "--critic-lr", "1e-2"]
    run_clis(([*args, "--out", str(tmp_path / "fsdp")], 2),
             ([*args, "--out", str(tmp_path / "single"), "--no-fsdp"], None))
    fsdp, single = metrics(tmp_path / "fsdp"), metrics(tmp_path / "single")
    # one sample per turn of each of the 8 dialogues; some ended early (at 100), so turns < 3 on average
    assert single[0]["samples"] == fsdp[0]["samples"] == single[0]["turns"] * 8 < 3 * 8 and single[0]["success"] > 0
    keys = [k for k in (PPO_COMPARED if algo == "ppo" else COMPARED) if k != "kl_ref"] + ["samples"]
    assert_same_metrics(single, fsdp, keys, rel=1e-5, abs_=1e-6, what=f"{algo} strip: --no-fsdp vs torchrun")


# ---------------------------------------------------------------------------------------------------------
# 3. Kill and resume (single process, PPO: policy + critic, two optimizers, two LR schedules)

# 8 dialogues per step in 2 micro-batches per optimizer step, 2 optimizer steps per training step (a shuffled
# split), and a warmup (3 of the 6 steps) so the LR schedules' state matters too.
RESUME = [*SMALL, "--algo", "ppo", "--group-size", "2", "--micro-batch", "2", "--mini-batches", "2",
          "--lr", "1e-2", "--critic-lr", "1e-2", "--warmup-ratio", "0.5", "--steps", "6"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_qwen2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    run_cli(["--model", tiny_qwen2, "--out", out, *RESUME, "--save-every", "2"])
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    assert len({x["lr"] for x in m}) > 1  # the warmup really changes the LR across steps
    return out, m


def start(args):
    # a session of its own, so the test can SIGKILL the whole process group like a crash or OOM kill would
    return subprocess.Popen(command(args), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_sigkill_then_resume_matches_uninterrupted_run(uninterrupted, tiny_qwen2, tmp_path):
    out = str(tmp_path / "killed")
    args = ["--model", tiny_qwen2, "--out", out, *RESUME, "--save-every", "2"]
    proc = start(args)
    metrics_path = os.path.join(out, "metrics.jsonl")
    # wait for step 3's metrics: step 2 is checkpointed, step 3 is logged but not saved
    wait_for(lambda: n_lines(metrics_path) >= 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoints(out)
    assert saved and saved[-1] < 6, f"the run finished before it could be killed (checkpoints {saved})"

    p = run_cli([*args, "--resume"])
    assert f"at step {saved[-1]}" in p.stdout, p.stdout
    resumed = metrics(out)
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5, 6]  # each step once: the unsaved step was redone
    # Rollouts are seeded per (seed, step, dialogue), the mini-batch order per (seed, step, epoch), and the
    # checkpoint restores weights, both AdamW states and both LR schedules: the redone steps are the same.
    assert_same_metrics(resumed, uninterrupted[1], rel=1e-6, abs_=1e-9, what="SIGKILL + --resume")


def test_sigterm_saves_exits_143_and_resume_continues(uninterrupted, tiny_qwen2, tmp_path):
    out = str(tmp_path / "terminated")
    args = ["--model", tiny_qwen2, "--out", out, *RESUME, "--save-every", "100"]  # no periodic checkpoint
    proc = start(args)
    metrics_path = os.path.join(out, "metrics.jsonl")
    wait_for(lambda: n_lines(metrics_path) >= 2, proc)  # well inside the training loop (handlers installed)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, stderr[-3000:]  # not 0: a scheduler or an `&&` chain sees an unfinished run
    assert "finishing this step" in stdout and "Traceback" not in stderr and "rlver: done." not in stdout
    done = n_lines(metrics_path)
    assert stderr.strip().splitlines()[-1] == (f"rlver: stopped by SIGTERM at step {done} of 6 (saved); continue "
                                               f"with: python rlver.py {' '.join(args)} --resume")
    assert checkpoints(out) == [done], "SIGTERM must checkpoint exactly the last finished step"
    assert 2 <= done < 6, f"the run was not stopped early ({done} steps)"

    p = run_cli([*args, "--resume"])
    assert f"at step {done}" in p.stdout, p.stdout
    resumed = metrics(out)
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5, 6]
    assert_same_metrics(resumed, uninterrupted[1], rel=1e-6, abs_=1e-9, what="SIGTERM + --resume")
    assert checkpoints(out)[-1] == 6


# ---------------------------------------------------------------------------------------------------------
# 5. The checkpoint's hf/ folder is a Hugging Face model


def hf_logits_check(hf_dir, initial_dir):
    from transformers import AutoModelForCausalLM

    ids = lm.load_tokenizer(hf_dir)(["I hear you. That sounds really hard.", "What happened next?"],
                                    padding=True, return_tensors="pt")["input_ids"]
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = theirs(ids).logits
        ours = lm.load_model(hf_dir)(ids)
        initial = lm.load_model(initial_dir)(ids)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    assert (ours - initial).abs().max() > 1e-2, "training did not change the saved weights"
    with open(os.path.join(hf_dir, "config.json")) as f, open(os.path.join(initial_dir, "config.json")) as g:
        assert json.load(f) == json.load(g)


def test_fsdp_checkpoint_loads_in_transformers(grpo_fsdp, tiny_qwen2, one_thread):
    hf_logits_check(os.path.join(grpo_fsdp, "checkpoints", "step_10", "hf"), tiny_qwen2)


def test_single_process_checkpoint_loads_in_transformers(uninterrupted, tiny_qwen2, one_thread):
    hf_logits_check(os.path.join(uninterrupted[0], "checkpoints", "step_6", "hf"), tiny_qwen2)


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_qwen2, tmp_path_factory):
    """The tiny checkpoint stored in bf16 (config.json says so), with a generation_config.json of its own."""
    path = str(tmp_path_factory.mktemp("bf16") / "tiny-bf16")
    model, cfg = lm.load_model(tiny_qwen2), lm.read_config(tiny_qwen2)
    cfg.hf = dict(cfg.hf, torch_dtype="bfloat16")
    lm.save_model(model.state_dict(), cfg, path, lm.load_tokenizer(tiny_qwen2))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 0], "temperature": 0.7, "top_p": 0.8}, f)
    return path


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_activation_checkpointing_trains_single_and_torchrun_and_hf_keeps_dtype(algo, bf16_checkpoint, tmp_path):
    # --activation-checkpointing recomputes each block in backward: one process and torchrun's 2 ranks train
    # the same step (the rollout runs without autograd, so the checkpointed branch never meets the KV cache)
    from safetensors import safe_open

    args = ["--model", bf16_checkpoint, *SMALL, "--algo", algo, "--group-size", "2", "--micro-batch", "2",
            "--lr", "1e-2", "--critic-lr", "1e-2", "--steps", "1", "--activation-checkpointing"]
    run_clis(([*args, "--out", str(tmp_path / "single")], None), ([*args, "--out", str(tmp_path / "fsdp")], 2))
    single, fsdp = metrics(tmp_path / "single"), metrics(tmp_path / "fsdp")
    assert single[0]["grad_norm"] > 1e-3
    keys = [k for k in (PPO_COMPARED if algo == "ppo" else COMPARED) if k != "kl_ref"]
    assert_same_metrics(single, fsdp, keys, rel=1e-5, abs_=1e-6, what=f"{algo} --activation-checkpointing")
    # hf/ keeps the source checkpoint's dtype (not the fp32 master weights) and its generation_config.json
    for out in ("single", "fsdp"):
        hf = tmp_path / out / "checkpoints" / "step_1" / "hf"
        with safe_open(str(hf / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert json.loads((hf / "generation_config.json").read_text()) == json.loads(
            open(os.path.join(bf16_checkpoint, "generation_config.json")).read())
        assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------------
# 6. User errors: exit code 2, one line, no traceback, before any model is loaded



def truncated_copy(tiny, d):
    """A copy of the tiny checkpoint whose model.safetensors lost its second half (an interrupted download)."""
    import shutil

    if not (d / "truncated").exists():
        shutil.copytree(tiny, d / "truncated")
        weights = d / "truncated" / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 2])
    return str(d / "truncated")


def earlier_run(out):
    """--out holding an earlier (GRPO) run: a checkpoint, its config, metrics and samples."""
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "step_2" / "DONE").write_text("")
    (out / "checkpoints" / "step_2" / "state.json").write_text(json.dumps({"step": 2, "algo": "grpo"}))
    (out / "config.json").write_text(json.dumps({"algo": "grpo", "profiles_per_step": 32, "group_size": 4}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    (out / "samples.jsonl").write_text(json.dumps({"step": 1}) + "\n")


# name: (arguments, words the error line must contain, prepare(out) or None)
ERRORS = {
    "bad model path": (lambda d, tiny: ["--model", str(d / "no-such-model")], "not a directory", None),
    "unsupported model_type": (lambda d, tiny: ["--model", str(d / "mistral")], "unsupported model_type", None),
    "malformed profiles": (lambda d, tiny: ["--model", tiny, "--train-profiles", str(d / "bad.jsonl")],
                           "bad.jsonl:2", None),
    "unreachable simulator": (lambda d, tiny: ["--model", tiny, "--simulator",
                                               f"http://127.0.0.1:{closed_port()}/v1"], "cannot reach", None),
    "grpo group of 1": (lambda d, tiny: ["--model", tiny, "--algo", "grpo", "--group-size", "1"], "--group-size",
                        None),
    "truncated safetensors": (lambda d, tiny: ["--model", truncated_copy(tiny, d)], "truncated", None),
    "ppo group of 0": (lambda d, tiny: ["--model", tiny, "--algo", "ppo", "--group-size", "0"],
                       "--group-size 0: must be >= 1", None),
    "no profiles per step": (lambda d, tiny: ["--model", tiny, "--profiles-per-step", "0"],
                             "--profiles-per-step 0: must be >= 1", None),
    "negative lr": (lambda d, tiny: ["--model", tiny, "--lr", "-1"], "--lr -1.0: must be > 0", None),
    "nan lr": (lambda d, tiny: ["--model", tiny, "--lr", "nan"], "--lr nan: give a finite number", None),
    "out is a file": (lambda d, tiny: ["--model", tiny], "is a file, not a folder",
                      lambda out: out.write_text("my notes\n")),
    "non-utf8 profiles": (lambda d, tiny: ["--model", tiny, "--train-profiles", str(d / "latin1.jsonl")],
                          "not UTF-8", None),
    "context too small": (lambda d, tiny: ["--model", tiny, "--max-context", "16", "--max-new-tokens", "8"],
                          "--max-context 16 leaves no room", None),
    "negative eval-every": (lambda d, tiny: ["--model", tiny, "--eval-every", "-1"], "--eval-every -1: must be >= 0",
                            None),
    "warmup of a whole run": (lambda d, tiny: ["--model", tiny, "--warmup-ratio", "0.02,1"],
                              "--warmup-ratio 0.02,1: give one or two fractions of --steps in [0, 1)", None),
    "parse-failure rate above 1": (lambda d, tiny: ["--model", tiny, "--max-parse-failure-rate", "2"],
                                   "--max-parse-failure-rate 2.0: must be in [0, 1]", None),
    "fresh run into an old out": (lambda d, tiny: ["--model", tiny], "holds an earlier run", earlier_run),
    "resume with another algo": (lambda d, tiny: ["--model", tiny, "--resume", "--algo", "ppo", "--group-size", "1",
                                                  "--profiles-per-step", "32"],
                                 "--algo ppo (the run used grpo)", earlier_run),
}


def snapshot(out):
    """Every file under out with its bytes (or out's own bytes when it is a file)."""
    if out.is_file():
        return {".": out.read_bytes()}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_user_errors_are_one_line_with_exit_code_2(tiny_qwen2, tmp_path):
    import shutil

    shutil.copytree(tiny_qwen2, tmp_path / "mistral")
    config = json.loads((tmp_path / "mistral" / "config.json").read_text())
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    good = (tmp_path / "good.jsonl")
    good.write_text(json.dumps({"persona": "p", "scenario": "s", "hidden_intention": "h", "opening": "o"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(good.read_text() + '{"persona": "p", "scenario": \n')
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"persona": "caf\u00e9", "scenario": "s", "hidden_intention": "h",
                                                        "opening": "o"}, ensure_ascii=False).encode("latin-1"))
    # all at once (each is a few seconds of imports), then check each
    procs = {}
    for name, (make_args, _, prepare) in ERRORS.items():
        out = tmp_path / name.replace(" ", "_")
        if prepare:
            prepare(out)
        before = snapshot(out) if out.exists() else None
        procs[name] = (subprocess.Popen(command([*make_args(tmp_path, tiny_qwen2), "--out", str(out), "--steps", "1"]),
                                        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out, before, time.time())
    for name, (proc, out, before, t0) in procs.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        seconds = time.time() - t0
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{stderr[-3000:]}"
        assert len(lines) == 1 and lines[0].startswith("rlver: error: "), f"{name}: stderr {stderr!r}"
        assert ERRORS[name][1] in lines[0], f"{name}: {lines[0]}"
        # before the heavy part: no model was built, nothing was written or lost, no training banner
        assert "rlver: grpo on" not in stdout and "rlver: ppo on" not in stdout, name
        if before is None:
            assert not os.path.exists(out / "config.json"), name
        else:
            assert snapshot(out) == before, f"{name}: the files in --out changed"
        assert seconds < 60, f"{name}: took {seconds:.0f}s to fail"


# ---------------------------------------------------------------------------------------------------------
# 6b. Simulators that misbehave (real HTTP servers on 127.0.0.1, tests/conftest.py), and a torn checkpoint

FAST = [*SMALL, "--group-size", "2", "--micro-batch", "8", "--save-every", "100"]  # 8 dialogues x 2 turns


def endpoint(server):
    return ["--simulator", server.url, "--simulator-model", "sim-model", "--simulator-key-env", "RLVER_TEST_KEY",
            "--simulator-timeout", "60"]


def test_unparseable_simulator_stops_the_run_with_the_last_step_saved(simulator_server, tiny_qwen2, tmp_path):
    out = str(tmp_path / "garbage")
    args = ["--model", tiny_qwen2, "--out", out, *FAST, "--steps", "3", *endpoint(simulator_server)]
    simulator_server.plan = ["ok"] * 16  # step 1: 8 dialogues x 2 turns answered well; then only garbage
    simulator_server.default = "garbage"
    p = run_cli(args, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "step 2: " in lines[0] and "unparseable" in lines[0] and "--max-parse-failure-rate" in lines[0]
    assert "--resume" in lines[0]
    # the warning shows one offending answer, never the key; step 1's line counts 0 failures
    assert "warning: step 2" in p.stdout and "I refuse to use your format" in p.stdout, p.stdout[-3000:]
    assert "parse fail 0/16" in p.stdout
    assert simulator_server.key not in p.stdout + p.stderr
    # step 1 is kept and checkpointed; the garbage step 2 trained nothing and wrote nothing
    assert checkpoints(out) == [1] and [m["step"] for m in metrics(out)] == [1]
    simulator_server.default = "ok"  # the simulator is fixed: the resume hint works
    p = run_cli([*args, "--resume"])
    assert "at step 1" in p.stdout and [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_simulator_failure_on_one_rank_stops_every_rank(simulator_server, tiny_qwen2, tmp_path):
    # Under torchrun the simulator fails for rank 1's dialogues only (HTTP 400, not retried): every rank must
    # stop together with that error (rank 0 prints it once), none left waiting in a collective
    records = [{"id": f"p{i}", "persona": f"Person {i}, 30.", "scenario": "A hard week.", "initial_emotion": 50,
                "hidden_intention": "You want to be listened to.", "opening": f"I had a hard week ({i})."}
               for i in range(2)]
    on_rank_1 = rlver.step_profiles(2, 2, 0, seed=0)[1]  # (one profile a rank at --profiles-per-step 2)
    records[on_rank_1]["persona"] += " REFUSE-ME"
    profiles = tmp_path / "two.jsonl"
    profiles.write_text("".join(json.dumps(r) + "\n" for r in records))
    simulator_server.refuse_marker = "REFUSE-ME"
    out = tmp_path / "one-rank"
    t0 = time.time()
    p = run_cli(["--model", tiny_qwen2, "--out", str(out), *FAST, "--profiles-per-step", "2", "--steps", "2",
                 "--train-profiles", str(profiles), *endpoint(simulator_server)], nproc=2, check=False, timeout=120)
    ours = [line for line in p.stderr.splitlines() if line.startswith("rlver: error: ")]
    assert p.returncode != 0 and len(ours) == 1, p.stderr[-3000:]
    assert "refused the request (HTTP 400" in ours[0] and "no step was completed" in ours[0], ours[0]
    assert time.time() - t0 < 100 and checkpoints(out) == []


def test_hanging_simulator_hits_the_turn_deadline(hanging_simulator_server, tiny_qwen2, tmp_path):
    out = tmp_path / "hang"
    t0 = time.time()
    p = run_cli(["--model", tiny_qwen2, "--out", str(out), *FAST, "--steps", "2", "--simulator-turn-deadline", "3",
                 *endpoint(hanging_simulator_server)], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    # the rollout engine sends each dialogue's turn to the simulator on its own, as soon as its reply is done
    assert "--simulator-turn-deadline" in lines[0] and re.search(r"only 0/\d+ requests answered", lines[0]), lines[0]
    assert time.time() - t0 < 60
    assert checkpoints(out) == [] and not (out / "metrics.jsonl").exists()  # nothing was completed


def test_turn_deadline_covers_both_stages_of_a_turn(simulator_server, tiny_qwen2, tmp_path):
    # every answer takes 1.2 s, under the 2 s deadline; a two-stage turn (rlver: analysis, then reply) takes
    # 2.4 s: the deadline is the turn's, so the run stops once the replies are out, with one line naming the flag
    simulator_server.sleep_s = 1.2
    out = tmp_path / "slow"
    p = run_cli(["--model", tiny_qwen2, "--out", str(out), *FAST, "--steps", "2", "--protocol", "rlver",
                 "--simulator-turn-deadline", "2", *endpoint(simulator_server)], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"only 8/16 requests answered within the turn deadline of 2 s .*raise "
                     r"--simulator-turn-deadline\. Stopped: no step was completed", lines[0]), lines[0]
    stages = [payload["messages"][-1]["content"].splitlines()[0] for _, payload in simulator_server.posts]
    assert "Step: analysis" in stages and "Step: reply" in stages   # both stages were asked, each in time
    assert checkpoints(out) == [] and not (out / "metrics.jsonl").exists()


def test_second_ctrl_c_exits_130_at_once_while_requests_hang(hanging_simulator_server, tiny_qwen2, tmp_path):
    out = str(tmp_path / "ctrlc")
    proc = start(["--model", tiny_qwen2, "--out", out, *FAST, "--steps", "2", *endpoint(hanging_simulator_server)])
    wait_for(lambda: len(hanging_simulator_server.posts) >= 8, proc)  # every request of turn 1 hangs
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first Ctrl-C waits for the step
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 10, (proc.returncode, stderr[-3000:])
    assert "finishing this step" in stdout and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlver: interrupted"), stderr[-3000:]


def test_rate_limited_simulator_is_retried_after_retry_after(simulator_server, tiny_qwen2, tmp_path):
    simulator_server.plan, simulator_server.retry_after = ["429"], "2"
    run_cli(["--model", tiny_qwen2, "--out", str(tmp_path / "429"), *FAST, "--steps", "1",
             *endpoint(simulator_server)])
    posts, times = simulator_server.posts, simulator_server.post_times
    assert len(posts) == 17  # 16 answered turns + the refused first attempt
    retry = next(i for i in range(1, 17) if posts[i][1] == posts[0][1])  # the same request, sent again
    assert times[retry] - times[0] >= 2.0  # it waited the server's Retry-After (2 s), not the 1 s backoff


def test_resume_survives_a_kill_between_done_and_rename(uninterrupted, tiny_qwen2, tmp_path):
    import shutil

    out = tmp_path / "torn"
    shutil.copytree(uninterrupted[0], out)
    # killed after DONE was written into step_6.tmp, before the rename to step_6: step_4 is the last complete one
    os.rename(out / "checkpoints" / "step_6", out / "checkpoints" / "step_6.tmp")
    assert (out / "checkpoints" / "step_6.tmp" / "DONE").exists() and checkpoints(out) == [4]
    p = run_cli(["--model", tiny_qwen2, "--out", str(out), *RESUME, "--save-every", "2", "--resume"])
    assert "at step 4" in p.stdout, p.stdout
    assert_same_metrics(metrics(str(out)), uninterrupted[1], rel=1e-6, abs_=1e-9, what="torn checkpoint + --resume")
    # samples.jsonl is trimmed like metrics.jsonl: every step's transcripts once (--log-samples 2)
    steps = [json.loads(line)["step"] for line in open(out / "samples.jsonl")]
    assert sorted(steps) == [s for s in range(1, 7) for _ in range(2)], steps
    assert checkpoints(out) == [4, 6]


def test_overwrite_replaces_an_earlier_run(tiny_qwen2, tmp_path):
    out = tmp_path / "old"
    earlier_run(out)
    # (the demanding simulated user and a tighter clip: every trainer flag has a run in the suite)
    run_cli(["--model", tiny_qwen2, "--out", str(out), *FAST, "--steps", "1", "--overwrite", "--mode", "challenging",
             "--clip-ratio", "0.1"])
    assert checkpoints(out) == [1]  # the old step_2 is gone, not kept as "the latest" model
    assert [m["step"] for m in metrics(str(out))] == [1] and "reward_std" in metrics(str(out))[0]
    assert {json.loads(line)["step"] for line in open(out / "samples.jsonl")} == {1}
    assert json.loads((out / "config.json").read_text())["micro_batch"] == 8


def test_help_shows_every_default():
    p = run_cli(["--help"])
    text = " ".join(p.stdout.split())
    assert "4 for grpo, 1 for ppo" in text and "(default: None)" not in text
    assert "Demo mode" in text and "--lr 0.01" in text and "--steps 30" in text and "OMP_NUM_THREADS" in text
    assert "--max-parse-failure-rate" in text and "(default: rlver)" in text  # the simulator's flags (simulator.py)


# ---------------------------------------------------------------------------------------------------------
# 7. Demo mode


def test_demo_mode_makes_a_tiny_model_and_trains(tmp_path):
    out = tmp_path / "demo"
    p = run_cli(["--steps", "2", "--out", str(out)])
    assert "demo mode" in p.stdout and "rlver: done." in p.stdout
    # curves.svg is written with the checkpoint, is well-formed SVG, and the final line names it
    import xml.etree.ElementTree as ET

    curves = out / "curves.svg"
    assert f"curves: {curves}" in p.stdout
    root = ET.parse(curves).getroot()
    assert root.tag.endswith("svg") and "reward" in curves.read_text()
    series = root.findall(".//{http://www.w3.org/2000/svg}polyline[@class='series']")
    assert len(series) >= 5 and all(len(line.get("points").split()) == 2 for line in series)  # 2 steps each
    tiny = out / "tiny-qwen2"
    assert (tiny / "config.json").is_file() and lm.read_config(str(tiny)).model_type == "qwen2"
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert checkpoints(out) == [2]
    config = json.loads((out / "config.json").read_text())
    # the demo's defaults, except what was given on the command line
    assert config["model"] == str(tiny) and config["steps"] == 2 and config["think"] is False
    assert config["lr"] == rlver.DEMO["lr"] and config["profiles_per_step"] == rlver.DEMO["profiles_per_step"]


# ---------------------------------------------------------------------------------------------------------
# 8. The profile schedule: epoch by epoch, each epoch a permutation of the training set


@pytest.mark.parametrize("n_profiles,per_step", [(105, 32), (10, 4), (7, 7), (5, 12)])
def test_step_profiles_visit_every_profile_once_per_epoch(n_profiles, per_step):
    # 10 steps' schedules laid end to end and cut into epochs: each whole epoch is a permutation of the set
    stream = [i for step in range(10) for i in rlver.step_profiles(n_profiles, per_step, step, seed=3)]
    epochs = [stream[e * n_profiles:(e + 1) * n_profiles] for e in range(len(stream) // n_profiles)]
    assert len(epochs) >= 2  # the steps cross at least two epoch boundaries
    for epoch in epochs:
        assert sorted(epoch) == list(range(n_profiles))
    assert len({tuple(e) for e in epochs}) > 1  # and each epoch is shuffled anew (not one order repeated)
    # the schedule is a pure function of (step, seed): a resumed run draws the same profiles
    assert rlver.step_profiles(n_profiles, per_step, 4, seed=3) == stream[4 * per_step:5 * per_step]
    assert rlver.step_profiles(n_profiles, per_step, 4, seed=4) != stream[4 * per_step:5 * per_step]


# ---------------------------------------------------------------------------------------------------------
# 9. Master weights: bf16 compute keeps fp32 parameters and AdamW state (the plain --no-fsdp path, in-process)


def changed_share(before, model):
    """Share of all parameter entries that differ from `before` (name -> tensor)."""
    changed = sum((p.detach().float() != before[n].float()).sum().item() for n, p in model.named_parameters())
    return changed / sum(p.numel() for p in before.values())


def test_no_fsdp_bf16_keeps_fp32_master_weights_so_small_updates_survive(tiny_qwen2, tmp_path, monkeypatch,
                                                                          one_thread):
    """
    With bf16 parameters, AdamW's lr 1e-6 update (~1e-6 per weight) is far below half a bf16 step (~1e-4 for a
    weight of 0.05) and rounds away: a few % of the weights move in 10 steps. rlver builds what it trains in
    fp32 and gets bf16 compute from torch.autocast: nearly every weight moves, while the logits of generation,
    scoring and the update are bf16. Everything below is rlver's own code: setup (the model and optimizer it
    builds for `--no-fsdp --dtype bfloat16`), rollout, score, update.
    """
    import torch.distributed as dist

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(closed_port())).items():
        monkeypatch.setenv(key, value)  # setup() joins a process group of one; restored after the test
    argv = ["--model", tiny_qwen2, "--out", str(tmp_path), "--no-fsdp", "--dtype", "bfloat16", "--lr", "1e-6",
            "--kl-coef", "0", "--micro-batch", "4", *SMALL, "--mini-batches", "2"]  # 2: pi_old gets its own pass
    args = rlver.get_args(argv)
    run = rlver.setup(args)
    try:
        policy, optimizer = run.policy, run.optimizer
        assert {p.dtype for p in policy.parameters()} == {torch.float32}
        logit_dtypes = {}
        phase = ["rollout"]
        handle = policy.lm_head.register_forward_hook(
            lambda module, inputs, out: logit_dtypes.setdefault(phase[0], set()).add(out.dtype))
        profiles = sim.prepare_profiles(run.profiles[:4], run.backend, protocol=args.protocol, mode=args.mode)
        dialogues = ro.rollout(policy, run.tokenizer, profiles, run.backend, think=False, max_turns=2,
                               max_new_tokens=8, seeds=[0, 1, 2, 3])
        phase[0] = "score"
        batch = rlver.score_rollouts(run, args, ro.training_samples(dialogues))
        old_logprobs, mask = batch["old_logprobs"], batch["mask"]
        batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * mask  # (B, T-1): every row a gradient
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        phase[0] = "update"
        for step in range(10):
            rlver.update(run, batch, args, step)
        handle.remove()
        assert logit_dtypes == {"rollout": {torch.bfloat16}, "score": {torch.bfloat16}, "update": {torch.bfloat16}}
        assert old_logprobs.dtype == torch.float32  # log-softmax in fp32 over the bf16 logits
        assert {p.dtype for p in policy.parameters()} == {torch.float32}
        assert {s[k].dtype for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")} == {torch.float32}
        fp32_share = changed_share(before, policy)
        assert fp32_share > 0.99, fp32_share  # observed ~0.9999

        # The control: the same 10 updates on bf16 parameters (what --no-fsdp built on a GPU before) move few
        # weights, so the threshold above does separate the two.
        buggy = lm.load_model(tiny_qwen2, dtype=torch.bfloat16)
        bf16_run = dataclasses.replace(run, policy=buggy, optimizer=torch.optim.AdamW(buggy.parameters(), lr=1e-6))
        before = {n: p.detach().clone() for n, p in buggy.named_parameters()}
        for step in range(10):
            rlver.update(bf16_run, batch, args, step)
        bf16_share = changed_share(before, buggy)
        assert bf16_share < 0.2, bf16_share
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# In process: rlver's own setup, rollout, scoring and update, called one by one


@contextlib.contextmanager
def in_process(argv, monkeypatch):
    """(run, args) of rlver.setup for argv in this process, in a process group of one (torn down after)."""
    import torch.distributed as dist
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(closed_port())).items():
        monkeypatch.setenv(key, value)  # restored after the test
    args = rlver.get_args(argv)
    run = rlver.setup(args)
    try:
        yield run, args
    finally:
        dist.destroy_process_group()


def tiny_run(tiny_qwen2, tmp_path, algo, *extra):
    """Flags of a small single-process run: 2 profiles x 2 rollouts, 2 turns of 8 tokens."""
    return ["--model", tiny_qwen2, "--no-fsdp", "--algo", algo, "--out", str(tmp_path), "--profiles-per-step", "2",
            "--group-size", "2", "--max-turns", "2", "--max-new-tokens", "8", "--micro-batch", "2", "--lr", "1e-2",
            "--no-think", *extra]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_first_optimizer_step_at_a_temperature_has_ratio_1(algo, tiny_qwen2, tmp_path, monkeypatch, one_thread):
    # --temperature 0.7 --mini-batches 2: pi_old comes from the scoring pass and pi_theta from the update's
    # forward, two calls that must both divide the logits by the sampling temperature. Before the first
    # optimizer step they are one policy: ratio 1, approx KL 0, clip fraction 0. (With the default one
    # mini-batch the update reuses its own forward as pi_old, so a temperature missing there goes unseen.)
    argv = tiny_run(tiny_qwen2, tmp_path, algo, "--temperature", "0.7", "--mini-batches", "2", "--kl-coef", "1e-3",
                    "--critic-lr", "1e-2")
    with in_process(argv, monkeypatch) as (run, args):
        dialogues = rlver.play(run, args, run.profiles[:2], 2, [ro.rollout_seed(0, 0, j) for j in range(4)], 0.7)
        rewards = torch.tensor([sim.reward(d.episode) for d in dialogues])
        batch = rlver.score_rollouts(run, args, ro.training_samples(dialogues))
        ids, mask = batch["ids"], batch["mask"]

        @torch.no_grad()
        def plain_logprobs(policy):  # the independent reference: a plain forward, logits / 0.7, log-softmax
            return torch.log_softmax(policy(ids[:, :-1]) / 0.7, -1).gather(-1, ids[:, 1:, None])[..., 0]

        plain = plain_logprobs(run.policy)  # (B, T-1) pi_old and pi_ref must equal it
        for key in ("old_logprobs", "ref_logprobs"):
            torch.testing.assert_close(batch[key][mask], plain[mask], atol=1e-5, rtol=0)
        batch["advantages"] = rlver.advantages(run, args, batch, rewards)
        full_run = copy.deepcopy(run)
        full = rlver.update(full_run, copy.deepcopy(batch), args, 0)
        assert abs(full["ratio_mean"] - 1) > 1e-4  # the second mini-batch runs after an optimizer step
        # and the steps went down the loss: the sampled tokens' log-probs moved with their advantages (the
        # reference's did not), and (PPO) the critic's values towards the returns
        assert (batch["advantages"] * (plain_logprobs(full_run.policy) - plain))[mask].sum() > 0
        torch.testing.assert_close(plain_logprobs(full_run.reference), plain)
        if algo == "ppo":
            with torch.no_grad():
                errors = [((c(ids) - batch["returns"])[mask] ** 2).mean() for c in (run.critic, full_run.critic)]
            assert errors[1] < errors[0], errors
        # only the first mini-batch of the update's seeded shuffle keeps its policy tokens, so the step's
        # token-weighted metrics are those of the first optimizer step
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(rlver.shuffle_seed(args.seed, 0)))
        batch["mask"][order.tensor_split(2)[1]] = False
        first = rlver.update(run, batch, args, 0)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6), first
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-6) and first["clip_frac"] == 0.0, first
    if algo == "grpo":  # the k3 KL to the reference (scored at the same temperature) is 0 too
        assert first["kl"] == pytest.approx(0.0, abs=1e-6), first


def test_rollout_seeds_give_each_dialogue_its_own_stream(tiny_qwen2, tmp_path, monkeypatch, one_thread):
    # distinct seeds for every (run seed, step, dialogue), and the 4 rollouts of one GRPO group (same
    # profile, same prompt) really differ: train_step gives each dialogue its own stream
    seeds = [ro.rollout_seed(seed, step, i) for seed in range(3) for step in range(50) for i in range(256)]
    assert len(set(seeds)) == len(seeds)
    argv = tiny_run(tiny_qwen2, tmp_path, "grpo", "--group-size", "4", "--micro-batch", "8")
    with in_process(argv, monkeypatch) as (run, args):
        _, dialogues = rlver.train_step(run, args, 0)
    for g in range(2):
        group = dialogues[4 * g:4 * g + 4]
        assert len({d.episode.profile.id for d in group}) == 1
        assert len({tuple(d.ids) for d in group}) == 4, f"group {g}: rollouts repeat each other"


# ---------------------------------------------------------------------------------------------------------
# The update: with one epoch of one mini-batch pi_old is the update's own forward (no scoring pass)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_update_without_scoring_pass_equals_the_scored_update(algo, tiny_qwen2, tmp_path, monkeypatch, one_thread):
    # two paths through the same update; its independent references: the scored log-probs against a plain
    # forward (test_first_optimizer_step_at_a_temperature_has_ratio_1), the unscored path's loss against
    # numbers worked from the dialogues (test_training_step_against_numbers_worked_from_its_dialogues)
    import copy
    import torch.distributed as dist
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(closed_port())).items():
        monkeypatch.setenv(k, v)
    argv = ["--model", tiny_qwen2, "--no-fsdp", "--algo", algo, "--out", str(tmp_path), "--profiles-per-step", "2",
            "--group-size", "2", "--max-turns", "2", "--max-new-tokens", "8", "--micro-batch", "2", "--lr", "1e-2",
            "--no-think"] + (["--kl-coef", "0"] if algo == "ppo" else [])  # PPO's KL reward needs pi_old first
    args = rlver.get_args(argv)
    run = rlver.setup(args)
    try:
        assert rlver.reuses_update_forward(run, args)
        dialogues = rlver.play(run, args, run.profiles[:4], 1, [ro.rollout_seed(0, 0, j) for j in range(4)], 1.0)
        rewards = torch.tensor([sim.reward(d.episode) for d in dialogues])
        samples = ro.training_samples(dialogues)
        results = []
        for scored in (True, False):
            r = copy.deepcopy(run)
            scoring_args = copy.copy(args)
            scoring_args.mini_batches = 2 if scored else 1  # two mini-batches: the scoring pass of the current path
            batch = rlver.score_rollouts(r, scoring_args, samples)
            assert ("old_logprobs" in batch) == scored
            batch["advantages"] = rlver.advantages(r, args, batch, rewards)
            stats = rlver.update(r, batch, args, 0)
            results.append((stats, batch["old_logprobs"] * batch["mask"], [p.detach().clone() for p in r.policy.parameters()]))
        (s1, old1, p1), (s2, old2, p2) = results
        assert s1.keys() == s2.keys() and "entropy" in s1
        for k in s1:
            assert s2[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), k
        torch.testing.assert_close(old2, old1, rtol=1e-5, atol=1e-5)  # filled in by the update's forward
        for a, b in zip(p1, p2):
            # (Adam's first step is ~lr * sign(grad): a rounding-level gradient difference shows up on the
            # parameters whose gradient is ~0, so the bound is 1% of one lr=1e-2 step)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
        assert any(not torch.equal(a, b) for a, b in zip(p1, run.policy.parameters()))  # the update moved it
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# --think-history strip: one sample per policy turn, each carrying its dialogue's reward / advantage


@pytest.mark.parametrize("flags,a", [([], 0.2 / (0.2 * 2 ** 0.5 + 1e-6)), (["--no-std"], 0.2)])
def test_strip_samples_take_their_dialogues_group_advantage(flags, a):
    # dialogues 0, 1 form one group (rewards 0.2, 0.6: advantages -/+ 0.2 / std, std = 0.2 * sqrt(2); with
    # --no-std, Dr.GRPO, -/+ 0.2); dialogue 0 has two turn samples, dialogue 1 one
    S = ro.Sample
    samples = [S([1, 5, 6], [False, True, True], 0), S([1, 5, 6, 7, 8], [False, False, False, True, True], 0),
               S([1, 9, 9, 9], [False, True, True, True], 1)]
    ids, mask = ro.collate(samples, 0, "cpu")
    batch = {"ids": ids, "mask": mask, "dialogue": torch.tensor([0, 0, 1])}
    args = rlver.get_args(["--algo", "grpo", "--group-size", "2", *flags])
    adv = rlver.advantages(None, args, batch, torch.tensor([0.2, 0.6]))
    want = torch.tensor([[-a, -a, 0, 0], [0, 0, -a, -a], [a, a, a, 0]])
    torch.testing.assert_close(adv, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("history", ["keep", "strip"])
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_training_step_against_numbers_worked_from_its_dialogues(algo, history, tiny_qwen2, tmp_path, monkeypatch,
                                                                 one_thread):
    # One train_step (--think, both --think-history modes) against numbers worked out from its dialogues
    # alone: every sampled token is trained once (strip: in its turn's sample) with its dialogue's reward.
    # GRPO: the first step's loss (ratio 1, no KL) is -sum_d A_d n_d / N (A_d: the group formula, n_d: the
    # dialogue's sampled tokens, N: all of them). PPO: every policy token's return is its dialogue's reward
    # (gamma = lambda = 1, the reward on each sample's last token), so the token mean of the returns is
    # sum_d r_d n_d / N. The independent reference of the single process that the FSDP comparisons use.
    argv = tiny_run(tiny_qwen2, tmp_path, algo, "--max-turns", "3", "--max-new-tokens", "12", "--think",
                    "--think-history", history, "--micro-batch", "4")
    with in_process(argv, monkeypatch) as (run, args):
        eos = torch.arange(run.policy.config.vocab_size) == run.tokenizer.eos_token_id  # (V,)
        # +4 on the EOS logit: turns and dialogues of different lengths, so token weights show
        run.policy.lm_head.register_forward_hook(lambda module, inputs, logits: logits + 4.0 * eos)
        m, dialogues = rlver.train_step(run, args, 0)
    rewards = [sim.reward(d.episode) for d in dialogues]
    n = [sum(d.policy_mask) for d in dialogues]
    # keep: one sample per dialogue; strip: one per policy turn, more than dialogues, as many as turns played
    samples = 4 * m["turns"] if history == "strip" else 4
    assert m["samples"] == sum(len(d.samples) for d in dialogues) == pytest.approx(samples)
    assert history == "keep" or m["samples"] > 4
    assert m["prefill_tokens"] <= 1.1 * m["conversation_tokens"]
    if algo == "grpo":
        # groups of 2 dialogues: (r - mean) / (unbiased std + 1e-6) over the group's samples (keep: one per
        # dialogue; strip: one per turn, as the official think trainer groups them, so longer dialogues weigh more)
        turns = [len(d.samples) if history == "strip" else 1 for d in dialogues]
        adv = []
        for lo in (0, 2):
            g = [r for r, t in zip(rewards[lo:lo + 2], turns[lo:lo + 2]) for _ in range(t)]
            mean, std = statistics.mean(g), statistics.stdev(g)
            adv += [(r - mean) / (std + 1e-6) if std > 0 else 0.0 for r in rewards[lo:lo + 2]]
        want = -sum(a * k for a, k in zip(adv, n)) / sum(n)
        assert abs(want) > 1e-3, (rewards, n)  # a real value: some group's rewards differ
        assert m["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    else:
        want = sum(r * k for r, k in zip(rewards, n)) / sum(n)
        assert abs(want - sum(rewards) / 4) > 1e-4, (rewards, n)  # the token weighting shows
        assert m["returns_mean"] == pytest.approx(want, rel=1e-5)
