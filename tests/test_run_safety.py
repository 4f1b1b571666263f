"""Run safety through the real CLI (subprocesses, no mocks): what a long run meets besides bad flags.

  one writer   a second run (or eval) into a busy --out stops with one line naming the holder (an OS lock)
  eval out     an earlier eval is refused, --overwrite replaces it; Ctrl-C exits 130 with one line
  damage       --resume skips a damaged newest checkpoint (left in place), refuses when none is readable,
               repairs torn metrics/samples lines; a failed save removes its .tmp and keeps every checkpoint
  signals      a stop asked during a save ends right after it (130 / 143, "stopped at step N of M"); a second
               Ctrl-C during a save exits 130 at once
  input        invalid Unicode in a profile, duplicate profile ids, duplicate --seeds, non-numeric leaderboard
               values: exit 2, one line naming the file and line

Every run here is a copy of one 4-step demo run (module fixture) in another folder, so each also shows that a
moved run folder resumes (its model lies inside it: `python rlver.py` with no --model).
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
import benchmark
from test_rlver import TIMEOUT, assert_same_metrics, checkpoints, cli_env, command, metrics, run_cli, snapshot, wait_for

BENCHMARK = os.path.join(ROOT, "benchmark.py")
RESUME = ["--steps", "4", "--save-every", "2", "--resume"]  # the demo_run fixture's flags, resumed


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python rlver.py --steps 4 --save-every 2`: the demo's tiny model inside --out, checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("demo") / "run"
    run_cli(["--steps", "4", "--save-every", "2", "--out", str(out)])
    assert checkpoints(out) == [2, 4]
    return out, metrics(out)


def moved_copy(demo_run, tmp_path):
    out = tmp_path / "moved"
    shutil.copytree(demo_run[0], out)
    return out


def start(args, prog=None, **kw):
    return subprocess.Popen(([sys.executable, prog, *args] if prog else command(args)), cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def one_line(p, code, words):
    """The process exited `code` with exactly one stderr line containing `words`, and no traceback."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and words in lines[0], (p.returncode, p.stderr[-3000:])
    return lines[0]


def holder_named(out):
    """True once the run in `out` holds the lock (the lock file names it)."""
    try:
        return "pid" in (out / ".lock").read_text()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------
# One writer per --out


def test_second_run_into_a_busy_out_stops_naming_the_holder(tmp_path):
    out = tmp_path / "r"
    first = start(["--steps", "6", "--out", str(out), "--seed", "0"])
    wait_for(lambda: holder_named(out) and (out / "metrics.jsonl").exists(), first)  # mid-run, a step logged
    second = run_cli(["--steps", "3", "--out", str(out), "--seed", "1", "--lr", "0.02"], check=False)
    one_line(second, 2, f"--out {out} is in use by rlver.py (pid {first.pid} on ")
    stdout, stderr = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, stderr[-3000:]
    # nothing of the second run mixed in: each step once, the first run's config
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6] and checkpoints(out) == [6]
    assert json.loads((out / "config.json").read_text())["seed"] == 0


EVAL = ["eval", "--policy", None, "--limit", "2", "--max-turns", "2", "--max-new-tokens", "8"]


def test_eval_refuses_an_earlier_eval_and_overwrite_replaces_it(tiny_qwen2, tmp_path):
    # two folders holding the same earlier eval, so the refused run and the --overwrite run start together
    outs = {"refused": tmp_path / "eval", "overwrite": tmp_path / "eval-overwrite"}
    for out in outs.values():
        out.mkdir()
        for name in ("transcripts.jsonl", "summary.json", "trajectories.svg"):  # an earlier eval's files
            (out / name).write_text(f"earlier {name}\n")
    before = snapshot(outs["refused"])
    procs = {what: start([*EVAL[:2], tiny_qwen2, *EVAL[3:], "--out", str(out), *(["--overwrite"] if what == "overwrite"
                                                                                  else [])], BENCHMARK)
             for what, out in outs.items()}
    for p in procs.values():
        p.stdout, p.stderr = p.communicate(timeout=TIMEOUT)
    one_line(procs["refused"], 2, "holds an earlier eval (transcripts.jsonl, summary.json, trajectories.svg): replace "
                                  "it with --overwrite")
    assert snapshot(outs["refused"]) == before
    p, out = procs["overwrite"], outs["overwrite"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["config"]["overwrite"] is True
    assert len((out / "transcripts.jsonl").read_text().splitlines()) == 2  # the new eval's 2 dialogues only


def test_eval_into_a_busy_out_is_refused_and_ctrl_c_exits_130(tiny_qwen2, tmp_path):
    out = tmp_path / "eval"
    args = [*EVAL[:2], tiny_qwen2, "--seeds", "0,1,2", "--out", str(out)]  # 3 x 32 profiles x 9 turns: a while
    first = start(args, BENCHMARK)
    wait_for(lambda: holder_named(out), first)
    p = subprocess.run([sys.executable, BENCHMARK, *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
    one_line(p, 2, f"--out {out} is in use by benchmark.py (pid {first.pid} on ")
    first.send_signal(signal.SIGINT)
    first.stdout.read(), first.wait(timeout=30)
    first.stderr = first.stderr.read()
    one_line(first, 130, "benchmark.py eval: interrupted")
    assert not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------------
# Damaged state


def damage(out, step, how):
    trainer = out / "checkpoints" / f"step_{step}" / "trainer"
    if how == "trainer deleted":
        shutil.rmtree(trainer)
    else:  # a shard cut short (a disk that filled, a copy that stopped)
        shard = trainer / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])


def test_resume_skips_a_damaged_newest_checkpoint(demo_run, tmp_path):
    out = moved_copy(demo_run, tmp_path)
    damage(out, 4, "shard truncated")  # (a deleted trainer/ is found too: the next test)
    step_2 = snapshot(out / "checkpoints" / "step_2")
    p = run_cli(["--out", str(out), *RESUME])
    warnings = [line for line in p.stdout.splitlines() if "warning: --resume" in line]  # (not the step warnings)
    assert len(warnings) == 1 and f"{out}/checkpoints/step_4 is damaged" in warnings[0], p.stdout
    assert "left in place" in warnings[0] and "resumed from" in p.stdout and "at step 2" in p.stdout
    assert snapshot(out / "checkpoints" / "step_2") == step_2
    assert_same_metrics(metrics(out), demo_run[1], rel=1e-6, abs_=1e-9, what="damaged step_4 + --resume")


def test_resume_with_no_readable_checkpoint_is_one_line(demo_run, tmp_path):
    out = moved_copy(demo_run, tmp_path)
    damage(out, 2, "trainer deleted")
    damage(out, 4, "shard truncated")
    before = snapshot(out)
    line = one_line(run_cli(["--out", str(out), *RESUME], check=False), 2, "no checkpoint in")
    assert "step_2 is damaged" in line and "step_4 is damaged" in line and "is readable" in line
    assert snapshot(out) == before


def test_resume_from_a_garbled_checkpoint_is_one_line(demo_run, tmp_path):
    out = moved_copy(demo_run, tmp_path)
    shard = out / "checkpoints" / "step_4" / "trainer" / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))  # full length, every byte lost: found only by loading it
    before = snapshot(out)
    line = one_line(run_cli(["--out", str(out), *RESUME], check=False), 2, f"--resume: cannot load {out}/checkpoints/"
                                                                           f"step_4 (UnpicklingError: ")
    assert "move it out of" in line
    after = snapshot(out)
    assert after.pop(".lock") != before.pop(".lock") and after == before  # only the lock names its new holder


def test_moved_run_with_torn_last_lines_resumes_and_repairs_them(demo_run, tmp_path):
    out = moved_copy(demo_run, tmp_path)
    for name in ("metrics.jsonl", "samples.jsonl"):  # killed while writing step 5's rows
        with open(out / name, "a") as f:
            f.write('{"step": 5, "rew')
    p = run_cli(["--out", str(out), "--steps", "5", "--save-every", "2", "--resume"])
    assert "at step 4" in p.stdout
    assert sum("is torn" in line for line in p.stdout.splitlines()) == 2, p.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    assert_same_metrics(metrics(out)[:4], demo_run[1], what="torn lines repaired")
    assert [json.loads(line)["step"] for line in open(out / "samples.jsonl")] == [s for s in range(1, 6) for _ in "ab"]


def file_size_limit(limit):
    """preexec_fn: no file may grow past `limit` bytes (a write beyond fails with EFBIG, as a full disk does)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_failed_save_removes_its_tmp_and_keeps_every_checkpoint(demo_run, tmp_path):
    out = moved_copy(demo_run, tmp_path)
    saved = snapshot(out / "checkpoints")
    # 1 MB: the logs and hf/ (0.6 MB) are written, the trainer shard (2 MB) is not
    proc = start(["--out", str(out), "--steps", "5", "--save-every", "2", "--resume"],
                 preexec_fn=file_size_limit(1 << 20))
    proc.stdout, proc.stderr = proc.communicate(timeout=TIMEOUT)
    line = one_line(proc, 2, f"saving {out}/checkpoints/step_5.tmp failed (")
    assert "needs up to" in line and "MiB free on that disk" in line and "every earlier checkpoint kept" in line
    assert snapshot(out / "checkpoints") == saved  # no step_5.tmp left, steps 2 and 4 untouched


# ---------------------------------------------------------------------------------------------------------
# Signals during a save: freeze the run (SIGSTOP) while checkpoints/step_N.tmp exists, signal it, let it go on


def freeze_in_a_save(proc, out, steps):
    """SIGSTOP `proc` in the middle of one of these steps' saves; returns that step."""
    for step in steps:
        tmp = out / "checkpoints" / f"step_{step}.tmp"
        wait_for(tmp.exists, proc, poll=0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        if tmp.exists():  # not yet renamed: the save is in progress
            return step
        os.kill(proc.pid, signal.SIGCONT)
    pytest.fail("every save finished before the test could freeze it")


def ctrl_c_in_a_save(demo_run, tmp_path):
    """A resumed copy of the demo run, sent SIGINT in the middle of one of its saves. Returns (proc, out, step)."""
    out = moved_copy(demo_run, tmp_path)
    proc = start(["--out", str(out), "--steps", "9", "--save-every", "1", "--resume"])
    step = freeze_in_a_save(proc, out, range(5, 9))
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    return proc, out, step


def test_ctrl_c_during_a_save_stops_right_after_it(demo_run, tmp_path):
    proc, out, step = ctrl_c_in_a_save(demo_run, tmp_path)
    proc.stdout, proc.stderr = proc.communicate(timeout=TIMEOUT)
    line = one_line(proc, 130, f"rlver: stopped by SIGINT at step {step} of 9 (saved); continue with: python rlver.py")
    assert line.endswith("--resume") and "rlver: done." not in proc.stdout
    assert [m["step"] for m in metrics(out)][-1] == step and checkpoints(out)[-1] == step  # no step after it


def test_second_ctrl_c_during_a_save_exits_130_at_once(demo_run, tmp_path):
    proc, out, step = ctrl_c_in_a_save(demo_run, tmp_path)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    proc.stdout, proc.stderr = proc.communicate(timeout=30)
    one_line(proc, 130, "rlver: interrupted: stopped at once without saving")
    # the save it cut stays a step_N.tmp, which --resume ignores
    assert checkpoints(out)[-1] == step - 1 and (out / "checkpoints" / f"step_{step}.tmp").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and line


def test_bad_input_is_one_line_naming_the_file_and_line(tiny_qwen2, tmp_path):
    row = {"persona": "p", "scenario": "s", "hidden_intention": "h", "opening": "o"}
    (tmp_path / "surrogate.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "scenario": "a\ud800b"})
                                              + "\n")
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps({**row, "id": i}) + "\n" for i in ("a", "b", "a")))
    history = [{"role": "user", "content": "hi", "emotion-point": 40}]
    (tmp_path / "lb.jsonl").write_text(json.dumps({"id": "1", "emo_point": 50, "history": history}) + "\n" +
                                       json.dumps({"id": "2", "emo_point": "50", "history": history}) + "\n")
    out = tmp_path / "out"
    cases = {  # argv, prog, words of the line
        "lone surrogate": (["--train-profiles", str(tmp_path / "surrogate.jsonl"), "--out", str(out)], None,
                           f"{tmp_path / 'surrogate.jsonl'}:2: field 'scenario' holds invalid Unicode"),
        "duplicate ids": ([*EVAL[:2], tiny_qwen2, "--profiles", str(tmp_path / "dup.jsonl"), "--out", str(out)],
                          BENCHMARK, f"{tmp_path / 'dup.jsonl'}: lines 1 and 3 both have profile id 'a'"),
        "duplicate seeds": ([*EVAL[:2], tiny_qwen2, "--seeds", "0,0", "--out", str(out)], BENCHMARK,
                            "--seeds '0,0': give distinct"),
        "string emo_point": (["leaderboard", str(tmp_path / "lb.jsonl")], BENCHMARK,
                             f"{tmp_path / 'lb.jsonl'}:2: an emotion value is '50', not a number"),
    }
    procs = {name: start(argv, prog) for name, (argv, prog, _) in cases.items()}
    for name, proc in procs.items():
        proc.stdout, proc.stderr = proc.communicate(timeout=TIMEOUT)
        one_line(proc, 2, cases[name][2])
    assert not out.exists()  # nothing written anywhere
    (tmp_path / "lb.jsonl").write_text(json.dumps({"id": "1", "emo_point": 50, "history": [{**history[0],
                                                                                         "emotion-point": None}]}))
    with pytest.raises(benchmark.BenchmarkError, match=r"lb.jsonl:1: an emotion value is None, not a number"):
        benchmark.read_system(str(tmp_path / "lb.jsonl"))  # (a null in a turn: the same check, in process)
