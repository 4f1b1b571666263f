"""--official-prompts: the authors' prompts read from a checkout at run time, filled and parsed as their code does.

The checkout here is SYNTHETIC: files of the authors' layout (paths, variable names, {{placeholders}}, section
headers, the {{planning}} expression, an RLVER simulator file that does not parse as Python) in our own words.
A real HTTP simulator on 127.0.0.1 checks every request it receives against that layout and answers in the
authors' output format; the real CLIs play through it."""
import json
import os
import re
import subprocess
import sys
import threading
import http.server

import pytest

from conftest import ROOT, send_json

import benchmark
import simulator as sim

ANALYSIS_BODY = """SYNTH-ANALYSIS: judge how the reply lands.
# purpose
*{{target}}
# output format:
Content:
[what the NPC means]
%s:
[does it fit]
Activity:
[inner activity]
Analyse:
[feeling]
Change:
[a signed number]

# persona
{{%s}}
# scene
{{%s}}
**emotion now {{emotion}}
**context
{{dialog_history}}
"""
REPLY_BODY = """SYNTH-REPLY: answer in character.
*{{target}}
# output format:
Thinking:
[plan]
Response:
[the answer]
# persona
{{player_type}}
# scene
{{player_topic}}
**context
{{dialog_history}}
**latest
{{new_history}}
**feeling
{{planning}}
**band
{{emotion}}
"""
SAGE_SIM = f'''import json
target_prompt = """SYNTH-TARGET: talk it through."""

def planning_reply(player_data):
    template = """{ANALYSIS_BODY % ("TargetCompletion", "simulator_role", "simulator_scene")}"""
    prompt = template.replace("{{{{emotion}}}}", str(player_data["emo_point"]))
    prompt = prompt.replace("{{{{dialog_history}}}}", json.dumps(player_data["history"]))
    planning = {{}}
    planning["analyse"] = prompt.split("Analyse:")[-1]
    return planning

def player_reply(player_data, planning):
    template = """{REPLY_BODY}"""
    if not planning:
        planning['analyse'] = "SYNTH-OPEN: start with a short line"
        prompt = template.replace("{{{{planning}}}}", planning["analyse"])
    else:
        prompt = template.replace("{{{{planning}}}}", "OBJ:\\n" + planning['TargetCompletion'] + "\\nSUBJ:\\n" + planning["activity"] + planning["analyse"])
    if not player_data["history"]:
        prompt = prompt.replace("{{{{dialog_history}}}}", "SYNTH-START: you speak first").replace("{{{{new_history}}}}", "")
    return prompt
'''
RLVER_ANALYSIS = ANALYSIS_BODY % ("Reason", "player_type", "player_topic") + "**latest\n{{new_history}}\n"
RLVER_SIM = f'''import json
target_prompt = {{
    "chat": "SYNTH-OTHER: not this one",
    "eq": \'\'\'SYNTH-TARGET: talk it through.\'\'\'
    }}


def call_api(prompt):
"""a stub the authors left mis-indented: this file is not valid Python"""
    return None


class PlayerSimulator:
    def planning_reply(self, player_data):
        template = """{RLVER_ANALYSIS}"""
        prompt = template.replace("{{{{emotion}}}}", str(player_data["emo_point"]))
        return prompt

    def player_reply(self, player_data, planning):
        template = """{REPLY_BODY}"""
        if not planning:
            planning['analyse'] = "SYNTH-OPEN: start with a short line"
            prompt = template.replace("{{{{planning}}}}", planning["analyse"])
        else:
            prompt = template.replace("{{{{planning}}}}", "OBJ:\\n" + planning['reason'] + "\\nSUBJ:\\n" + planning["analyse"])
        if not player_data["history"]:
            prompt = prompt.replace("{{{{dialog_history}}}}", "SYNTH-START: you speak first").replace("{{{{new_history}}}}", "")
        return prompt
'''
POLICY = {"npc": "SYNTH-NPC: be a warm companion.", "unthink": "SYNTH-POLICY: cheer your friend up.",
          "think": "SYNTH-POLICY-THINK: think in <think></think>, then reply."}
ROLLOUT = "RLVER/code/verl/workers/rollout/vllm_rollout/"


def profile(i, first_talk=True):
    row = {"id": f"p{i}", "player": f"persona {i}: Lin, 30, a nurse who keeps things in", "main_cha": "passive",
           "cha_group": ["guarded"], "scene": f"scene {i}: a night shift went wrong",
           "task": "you want to hear it was not your fault"}
    return dict(row, first_talk=f"opening {i}: rough night...") if first_talk else row


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "digitalhuman"
    files = {"SAGE/simulator_response.py": SAGE_SIM,
             "SAGE/npc_response.py": f"def call_npc(history):\n    role_system = '''{POLICY['npc']}'''\n",
             "SAGE/profile/simulator_profile_withfirsttalk.jsonl": "".join(json.dumps(profile(i)) + "\n" for i in range(3)),
             ROLLOUT + "hard_player_simulator_dsv3.py": RLVER_SIM,
             ROLLOUT + "system_prompt.py": f"system_prompt_train_unthink = '''{POLICY['unthink']}'''\n"
                                           f"system_prompt_train_think = '''{POLICY['think']}'''\n",
             "RLVER/data/train_profile.jsonl": "".join(json.dumps(profile(i, False)) + "\n" for i in range(4))}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


class OfficialSimulator:
    """An OpenAI-compatible server on 127.0.0.1 playing the authors' simulated user (and, for model
    'policy-model', the agent). It checks every request against the synthetic layout and records a problem
    for each deviation; it answers the analysis with change `change` and distinct section texts."""

    def __init__(self, source, change="+15 points", policy=POLICY["npc"]):
        self.source, self.change, self.policy = source, change, policy
        self.unparseable = 0   # this many analyses (the first ones) come back without an integer
        self.problems, self.kinds, self.seen_emotions, self.lock = [], [], {}, threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                send_json(self, {"data": [{"id": "sim-model"}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    text = server.answer(payload["messages"], payload["model"])
                send_json(self, {"choices": [{"message": {"role": "assistant", "content": text}}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def check(self, ok, what):
        if not ok:
            self.problems.append(what)

    def history(self, text, header):
        """The JSON history after `header` (up to the next '**' line), with its roles checked."""
        block = text.split(header + "\n", 1)[1].split("\n**", 1)[0]
        messages = json.loads(block)
        self.check(all(set(m) == {"role", "content"} and m["role"] in ("你", "NPC") for m in messages), "roles")
        self.check(block.rstrip("\n") == json.dumps(messages, ensure_ascii=False, indent=2), "not json.dumps indent=2")
        return messages

    def answer(self, messages, model):
        if model == "policy-model":   # the agent: its system prompt must be the authors'
            self.check(messages[0] == {"role": "system", "content": self.policy}, f"policy prompt {messages[0]}")
            self.kinds.append("policy")
            return "I hear you. That sounds heavy."
        self.check(len(messages) == 1 and messages[0]["role"] == "user", "not ONE user message")
        text = messages[0]["content"]
        self.check("{{" not in text and "SYNTH-TARGET: talk it through." in text, "placeholder left or wrong target")
        persona = re.search(r"persona (\d+):", text).group(1)
        if text.startswith("SYNTH-ANALYSIS"):
            self.kinds.append("analysis")
            emotion = int(re.search(r"\*\*emotion now (\d+)\n", text).group(1))
            self.seen_emotions.setdefault(persona, []).append(emotion)
            if self.unparseable:
                self.unparseable -= 1
                return "Content:\nhmm\nChange:\n[no idea]"
            history = self.history(text, "**context")
            if self.source == "RLVER":   # all but the last two messages in the context, those two apart
                history += self.history(text, "**latest")
            self.check(history[0]["role"] == "你" and history[-1]["role"] == "NPC", "analysis history ends")
            middle = f"TargetCompletion:\n[tc-{persona}]" if self.source == "SAGE" else f"Reason:\n[rs-{persona}]"
            return (f"**Content：**\n[c-{persona}]\n{middle}\nActivity:\n[act-{persona}]\nAnalyse:\n"
                    f"[an-{persona}]\nChange:\n[{self.change}]")
        self.check(text.startswith("SYNTH-REPLY"), "unknown request")
        band = text.rsplit("**band\n", 1)[1].strip()
        self.check(band in {f"Emotion-{b}" for b in "SABCF"}, f"band {band!r}")
        if "SYNTH-OPEN: start with a short line" in text:   # an opening, asked as their code asks
            self.kinds.append("opening")
            self.check("SYNTH-START: you speak first" in text and "**latest\n\n" in text, "opening request")
            return f"Thinking:\nshy\nResponse:\n[“hi, I'm {persona}”]"
        self.kinds.append("reply")
        recent = self.history(text, "**latest")
        self.check([m["role"] for m in recent] == ["你", "NPC"], "latest two")
        want = (f"OBJ:\ntc-{persona}\nSUBJ:\nact-{persona}an-{persona}" if self.source == "SAGE"
                else f"OBJ:\nrs-{persona}\nSUBJ:\nan-{persona}")
        self.check(f"**feeling\n{want}\n" in text, "planning text")
        return f"Thinking:\nok\nResponse:\n[“tell me more, {persona}”]"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def cli(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    for k in ("http_proxy", "HTTP_PROXY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_eval_plays_sages_prompts_from_the_checkout(checkout, tmp_path, capsys):
    server = OfficialSimulator("SAGE")
    try:
        out = tmp_path / "eval"
        r = cli("benchmark.py", "eval", "--policy", server.url, "--policy-model", "policy-model", "--simulator",
                server.url, "--simulator-model", "sim-model", "--official-prompts", str(checkout / "SAGE"),
                "--out", str(out))
    finally:
        server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(set(server.problems)) == []
    # SAGE's 3 scenarios (its file, as no --profiles was given); change +15 clamped to +10 from 40: the
    # analyses see 40, 50, ..., 90 and the 6th reaches 100 (success)
    assert server.seen_emotions == {str(i): [40, 50, 60, 70, 80, 90] for i in range(3)}
    assert server.kinds.count("analysis") == server.kinds.count("reply") == 18 and "opening" not in server.kinds
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"] == 100 and summary["success"] == 3
    prov = summary["provenance"]
    assert prov["protocol"] == "sage" and prov["simulator"] == "sim-model"
    assert prov["simulator_prompts"]["source"] == "official SAGE"
    assert prov["simulator_prompts"]["files"]["SAGE/simulator_response.py"] == sim._sha256(
        checkout / "SAGE/simulator_response.py")
    assert prov["policy_prompt"]["source"] == "SAGE/npc_response.py:role_system"
    assert prov["profiles"]["count"] == 3 and prov["profiles"]["file"].endswith("simulator_profile_withfirsttalk.jsonl")
    records = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert all(rec["provenance"] == prov for rec in records)
    assert records[0]["turns"][0]["user"] == "tell me more, 0"   # the text after the last Response:, unquoted

    # the leaderboard: our run beside a SAGE published file of the same scenarios (its simulator named by its
    # folder), then beside a run whose simulator prompts were ours: refused, unless --allow-mixed
    published = tmp_path / "dataset" / "deepseek-v3-2024-1227_based_simulator" / "gpt-4.1_result.jsonl"
    published.parent.mkdir(parents=True)
    published.write_text("".join(json.dumps({"id": f"p{i}", "emo_point": 60, "history": [
        {"role": "user", "content": "x", "emotion-point": 40}, {"role": "user", "content": "y", "emotion-point": 60}]})
        + "\n" for i in range(3)))
    def leaderboard(*args):   # in process (the CLI's main): returns (exit code, stdout, stderr)
        try:
            benchmark.main(["leaderboard", *map(str, args)])
            code = 0
        except SystemExit as e:
            code = e.code
        return (code, *capsys.readouterr())
    code, stdout, stderr = leaderboard(out, published, "--versus", "GPT-4.1")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[1].split()[:2] == ["eval", "100.0"] and "sage | sim-model | official SAGE | 3 ids #" in lines[1]
    assert lines[2].split()[:2] == ["gpt-4.1", "60.0"] and "sage | deepseek-v3-2024-1227 | official SAGE" in lines[2]
    assert lines[1].split("|")[3] == lines[2].split("|")[3]   # the same scenario digest
    assert "eval vs gpt-4.1: 3 wins, 0 ties, 0 losses on 3 scenarios" in stdout
    ours = tmp_path / "ours" / "transcripts.jsonl"
    ours.parent.mkdir()
    ours.write_text("".join(json.dumps(dict(rec, provenance=dict(prov, simulator_prompts={"source": "ours"})))
                            + "\n" for rec in records))
    r = cli("benchmark.py", "leaderboard", str(out), str(ours))   # the real CLI, once
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "differ in simulator_prompts (eval: official SAGE, ours: ours)" in r.stderr
    code, stdout, stderr = leaderboard(out, ours, "--allow-mixed")
    assert code == 0 and "official SAGE* |" in stdout and "WARNING: --allow-mixed" in stderr


def test_two_training_steps_play_rlvers_prompts_from_a_file_that_is_not_python(checkout, tiny_qwen2, tmp_path):
    with pytest.raises(SyntaxError):
        compile((checkout / ROLLOUT / "hard_player_simulator_dsv3.py").read_text(), "sim", "exec")
    two_test_profiles = tmp_path / "two-test-profiles.jsonl"  # the periodic eval plays every test profile
    sage = (checkout / "SAGE/profile/simulator_profile_withfirsttalk.jsonl").read_text().splitlines(keepends=True)
    two_test_profiles.write_text("".join(sage[:2]))
    server = OfficialSimulator("RLVER", change="+5")
    try:
        r = cli("rlver.py", "--model", tiny_qwen2, "--out", str(tmp_path / "run"), "--steps", "2",
                "--profiles-per-step", "2", "--group-size", "2", "--max-turns", "2", "--max-new-tokens", "8",
                "--micro-batch", "4", "--save-every", "100", "--no-fsdp", "--simulator", server.url,
                "--simulator-model", "sim-model", "--official-prompts", str(checkout),
                "--train-profiles", str(checkout / "RLVER/data/train_profile.jsonl"), "--eval-every", "2",
                "--test-profiles", str(two_test_profiles))
    finally:
        server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(set(server.problems)) == []
    # no first_talk: each profile's opening asked for once (step 1: 2 profiles, step 2: the other 2), then
    # 2 dialogues x 2 turns per step; the live emotion: 30, then 35
    # (and the periodic eval at step 2: 2 test profiles with first_talk, 2 turns each)
    assert server.kinds.count("opening") == 4 and server.kinds.count("analysis") == 16 + 4
    assert sorted(server.seen_emotions["3"]) == [30, 30, 35, 35]   # a training profile only
    assert all(sorted(server.seen_emotions[p]) == [30, 30, 30, 35, 35, 35] for p in ("0", "1"))
    summary = json.loads((tmp_path / "run" / "eval" / "step_2" / "summary.json").read_text())
    assert summary["provenance"]["simulator_prompts"]["source"] == "official RLVER"
    assert summary["provenance"]["decoding"]["temperature"] == 0.0 and summary["score"] == 40
    assert (f"{summary['truncated_replies']} policy replies were cut" in r.stdout) == (summary["truncated_replies"] > 0)
    svg = (tmp_path / "run" / "eval" / "step_2" / "trajectories.svg").read_text()
    assert "step 2 (rlver protocol, simulator sim-model, official RLVER prompts)" in svg
    # a resumed run must play the same prompts
    server = OfficialSimulator("RLVER", change="+5")   # (reachable: the endpoint is checked before the flags)
    try:
        resumed = cli("rlver.py", "--model", tiny_qwen2, "--out", str(tmp_path / "run"), "--resume", "--simulator",
                      server.url, "--official-prompts", str(checkout), "--official-quirks")
    finally:
        server.close()
    assert resumed.returncode == 2 and "--official-quirks True (the run used False)" in resumed.stderr
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["reward"] for row in rows] == pytest.approx([0.4, 0.4])
    first = next((row["step"] for row in rows if row["truncated_replies"]), None)
    for row in rows:   # replies cut at the 8-token cap: counted in each step's metrics, warned once a run
        assert 0 <= row["truncated_replies"] <= 8 and row["cut_thoughts"] == row["changes_out_of_range"] == 0
        warned = f"rlver: warning: step {row['step']}: {row['truncated_replies']:g} policy replies were cut"
        assert (warned in r.stdout) == (row["step"] == first)


def test_official_quirk_through_eval_under_rlver(checkout, tmp_path):
    server = OfficialSimulator("RLVER", change="+5", policy=POLICY["unthink"])
    try:
        r = cli("benchmark.py", "eval", "--policy", server.url, "--policy-model", "policy-model", "--simulator",
                server.url, "--simulator-model", "sim-model", "--official-prompts", str(checkout / "RLVER"),
                "--protocol", "rlver", "--official-quirks", "--limit", "1", "--out", str(tmp_path / "e"),
                "--profiles", str(checkout / "SAGE/profile/simulator_profile_withfirsttalk.jsonl"))
    finally:
        server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.problems == [] and server.seen_emotions == {"0": [30] * 9}   # 30 -> 75, every analysis sees 30
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["score"] == 75 and summary["provenance"]["simulator_prompts"]["official_quirks"] is True
    with pytest.raises(sim.ProfileError, match="--official-quirks reproduces RLVER's trainer"):   # not in sage
        sim.load_official_prompts(checkout, "sage", False, quirks=True, simulator="http://x")


def test_eval_re_asks_an_unparsed_analysis_then_stops(checkout, tmp_path):
    # SAGE re-asks until the answer parses and never scores an unparsed turn: we re-ask twice, then refuse
    server = OfficialSimulator("SAGE")
    server.unparseable = 3
    try:
        r = cli("benchmark.py", "eval", "--policy", server.url, "--policy-model", "policy-model", "--simulator",
                server.url, "--simulator-model", "sim-model", "--official-prompts", str(checkout), "--limit", "1",
                "--out", str(tmp_path / "e"))
    finally:
        server.close()
    assert server.seen_emotions["0"][:4] == [40, 40, 40, 40]   # the first analysis asked 3 times (scored 0)
    assert r.returncode == 2 and "1/7 simulator turns were unparseable" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "e" / "summary.json").exists()


def test_eval_reply_cap_must_fit_the_context(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["eval", "--policy", str(tmp_path), "--max-new-tokens", "64", "--max-context", "64"])
    assert e.value.code == 2 and "--max-new-tokens 64 must be >= 1 and below --max-context 64" in capsys.readouterr().err


def test_official_quirk_shows_the_analysis_the_start_emotion(checkout):
    think = sim.load_official_prompts(checkout / "SAGE", "sage", True, simulator="http://x")   # SAGE has no
    assert think.policy == POLICY["think"] and think.policy_source.endswith("system_prompt_train_think")   # think
    prompts = sim.load_official_prompts(checkout, "rlver", False, quirks=True, simulator="http://x")
    p = sim.resolve_profile(sim.Profile("p1", "persona 1: x", "scene", "need", "opening 1", prompts=prompts), "rlver")
    ep = sim.new_episode(p)
    ep.emotion = 55
    text = sim.build_request(ep, "reply", step="analysis")[0]["content"]
    assert "**emotion now 30\n" in text   # the start, not 55
    prompts.start_emotion_quirk = False
    assert "**emotion now 55\n" in sim.build_request(ep, "reply", step="analysis")[0]["content"]


@pytest.mark.parametrize("edit, message", [
    (lambda root: (root / "SAGE/npc_response.py").unlink(), "npc_response.py"),
    (lambda root: (root / "SAGE/simulator_response.py").write_text("template = '''only one'''\n"),
     "1 template literal(s)"),
    (lambda root: (root / "SAGE/simulator_response.py").write_text(SAGE_SIM.replace("{{new_history}}", "")),
     "lacks {{new_history}}"),
    (lambda root: (root / "SAGE/simulator_response.py").write_text(SAGE_SIM.replace("target_prompt", "goal")),
     "has no target_prompt"),
])
def test_a_checkout_that_differs_fails_with_one_line(checkout, tmp_path, edit, message, capsys):
    edit(checkout)   # (in process: the CLI's own exit path; test_rlver's one-line test runs the subprocesses)
    with pytest.raises(SystemExit) as e:
        benchmark.main(["eval", "--policy", str(tmp_path), "--simulator", "http://127.0.0.1:9/v1",
                        "--official-prompts", str(checkout), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_rlver_change_outside_100_is_counted_and_warned(checkout):
    prompts = sim.load_official_prompts(checkout, "rlver", False, simulator="http://x")
    p = sim.resolve_profile(sim.Profile("p1", "persona 1: x", "scene", "need", "opening 1", prompts=prompts), "rlver")
    episodes = [sim.new_episode(p), sim.new_episode(p)]
    answers = iter(["Change:\n[+150]", "Change:\n-7", "Response:\nok", "Response:\nok"])
    sim.simulate_turn(episodes, ["a", "b"], sim.Scripted(lambda messages: next(answers)), max_turns=9)
    assert [(e.emotion, e.changes_out_of_range) for e in episodes] == [(100, 1), (23, 0)]   # unclamped, capped
    assert sim.count_warnings(benchmark.summarize(episodes), "evaluation") == [
        "warning: evaluation: 1 simulator changes were outside -100..100 (applied unclamped, as RLVER's trainer "
        "does): the simulator misreads its scale"]
