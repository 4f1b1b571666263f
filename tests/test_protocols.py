"""The official RLVER / SAGE data and rules: profiles in the public layouts (train rows without first_talk),
Chinese dialogues under the rules backend, the SAGE loop checked against an independent re-implementation of
SAGE/test_npc.py, the two-stage simulator over real HTTP, and `benchmark.py leaderboard` arithmetic.
All records are hand-made in the official layouts (the official files are not in the repository)."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT

import benchmark
import rollout as ro
import simulator as sim

SVG = "{http://www.w3.org/2000/svg}"

# Rows in RLVER/data/train_profile.jsonl's layout (id, player, scene, main_cha, cha_group, task; no first_talk)
TASKS = ["你希望对方用心倾听你的情绪宣泄", "你想分析事件中其他人物这么做的原因",
         "你希望对方深刻共情你的感受，而不是简单的安慰", "你想获得能真实帮助你解决当下困境的建议"]


def train_row(i):
    task = TASKS[i % len(TASKS)]
    return {"id": f"0000000{i}-aaaa-4bbb-8ccc-dddddddddddd", "player": f"* 姓名：小{i}\n* 年龄：2{i}岁\n* 说话风格：简短。",
            "scene": f"## 背景故事\n室友总在深夜打游戏，第{i}次吵醒我。\n####隐藏主题:\n***{task}",
            "main_cha": "回避型", "cha_group": ["谨慎", "内向", "自卑"], "task": task}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# 1. Official training rows: loaded as they are, the simulator writes the opening, 2 demo steps train


def test_official_train_rows_load_and_get_a_written_opening(tmp_path):
    profiles = sim.load_profiles(write_jsonl(tmp_path / "train_profile.jsonl", [train_row(i) for i in range(3)]))
    assert all(p.opening == "" and p.initial_emotion is None for p in profiles)
    with pytest.raises(ValueError, match="no opening line"):
        sim.new_episode(profiles[0])
    played = sim.prepare_profiles(profiles, sim.RulesBackend(), protocol="rlver")
    table = json.load(open(os.path.join(ROOT, "prompts", "rules_cues.json"), encoding="utf-8"))
    for p in played:
        assert p.lang == "zh" and p.initial_emotion == 30 and p.opening_written
        assert p.opening in table["openings"]["zh"]   # the rules backend's canned Chinese openings
    assert sim.new_episode(played[0]).emotion == 30
    assert [p.initial_emotion for p in sim.prepare_profiles(profiles, sim.RulesBackend(), protocol="sage")] == [40] * 3
    forced = sim.prepare_profiles(profiles, sim.RulesBackend(), protocol="sage", initial_emotion=55, lang="en")
    assert [(p.initial_emotion, p.lang) for p in forced] == [(55, "en")] * 3
    # the policy's system prompt follows the dialogue's language
    assert ro.policy_messages(sim.new_episode(played[0]), think=False)[0]["content"] == \
        sim.load_prompt("policy_system.txt", "zh").strip()


def test_official_train_rows_train_two_demo_steps(tmp_path):
    train = write_jsonl(tmp_path / "train_profile.jsonl", [train_row(i) for i in range(8)])
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "rlver.py"), "--train-profiles", train, "--protocol", "rlver",
                        "--steps", "2", "--eval-every", "0", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert samples and all(s["opening_written"] and s["initial_emotion"] == 30 and s["lang"] == "zh"
                           and s["protocol"] == "rlver" for s in samples)


# ---------------------------------------------------------------------------------------------------------
# 2. A Chinese dialogue's emotion moves under the rules backend


def zh_profile(emotion=50):
    return sim.Profile(id="zh", persona="李明，32岁，程序员。", scenario="项目失败后被领导当众批评。",
                       hidden_intention="你希望对方用心倾听你的情绪宣泄", opening="今天真是糟透了。",
                       initial_emotion=emotion)


@pytest.mark.parametrize("protocol", ["classic", "sage"])
def test_chinese_rules_emotion_moves_with_warmth_and_dismissal(protocol):
    warm = "听起来你真的很委屈，被当众批评一定很难受。我在听，你愿意慢慢说说发生了什么吗？"
    cold = "算了吧，这点小事，想开点，别想了，你应该学会看开。"
    finals = {}
    for name, reply in (("warm", warm), ("cold", cold)):
        (p,) = sim.prepare_profiles([zh_profile()], sim.RulesBackend(), protocol=protocol)
        ep = sim.new_episode(p)
        sim.simulate_turn([ep], [reply], sim.RulesBackend(), max_turns=3)
        assert any("\u4e00" <= ch <= "\u9fff" for ch in ep.turns[0]["user"])   # the user answers in Chinese
        finals[name] = ep.turns[0]["change"]
    assert finals["warm"] >= 5 and finals["cold"] <= -5, finals


# ---------------------------------------------------------------------------------------------------------
# 3. The SAGE loop: our protocol against a re-implementation of SAGE/test_npc.py on scripted simulator output


def sage_reference(changes, replies):
    """SAGE/test_npc.py:88-115 with simulator_response.py's update: returns (final emo_point, simulated user
    turns, agent replies, why it stopped)."""
    emo, k, agent, turns = 40, 0, 0, 0
    while True:
        turns += 1
        if turns > 10:
            return emo, k, agent, "max_turns"
        if turns > 1:   # turn 1 is first_talk: no simulator call, no update
            emo = min(emo + max(-10, min(10, changes[k])), 100)
            reply = replies[k]
            k += 1
            if "再见" in reply or "拜拜" in reply:   # the goodbye first, then the thresholds
                return emo, k, agent, "goodbye"
            if emo >= 100 or emo < 10:
                return emo, k, agent, "success" if emo >= 100 else "failure"
        agent += 1


SCRIPTS = {  # profile id -> (changes the analysis writes, replies the reply stage writes)
    "up": ([25] * 12, ["嗯。"] * 12),                            # clamp to +10: 100 after 6 changes (success)
    "down": ([-10, -10, -10, -1] + [0] * 8, ["唉。"] * 12),      # 10 is not failure, 9 is
    "bye": ([3, 2, 0] + [0] * 9, ["嗯。", "好吧。", "好吧，再见。"] + ["嗯。"] * 9),   # goodbye at emotion 45
    "flat": ([0] * 12, ["嗯。"] * 12),                           # runs the full length: 9 scored replies
    "edge": ([-10, -10, -10] + [0] * 9, ["嗯。"] * 12),          # stays at 10: never a failure
    # a goodbye on the very turn that crosses a threshold: the goodbye ends it (SAGE checks it first), and
    # the final emotion still counts as a success / failure
    "byeup": ([25] * 12, ["嗯。"] * 5 + ["太好了，拜拜。"] + ["嗯。"] * 6),   # 100 and goodbye at change 6
    "byedown": ([-10, -10, -10, -1] + [0] * 8, ["唉。"] * 3 + ["算了，再见。"] + ["唉。"] * 8),  # 9 and goodbye
}


def scripted_answer(messages):
    """A simulator that answers from SCRIPTS, told apart by the profile id we put in the persona."""
    system, user = messages[0]["content"], messages[-1]["content"]
    pid = next(p for p in SCRIPTS if f"[{p}]" in system)
    k = user.count("倾诉对象:")   # earlier agent replies (the latest one sits under its own header)
    changes, replies = SCRIPTS[pid]
    if "步骤: analysis" in user:
        return f"<thought>分析{k}</thought>\n<change>{changes[k]:+d}</change>"
    return f"<thought>计划</thought><reply>{replies[k]}</reply>"


def test_sage_protocol_matches_the_sage_loop(tmp_path):
    profiles = [sim.Profile(id=pid, persona=f"[{pid}] 小王，28岁。", scenario="工作压力大。", hidden_intention="你想被倾听",
                            opening="最近好累。") for pid in SCRIPTS]
    policy_calls = []

    def policy(messages):   # an endpoint-like policy client: one text per open dialogue
        policy_calls.append(messages)
        return "我在听，你说。"

    summary = benchmark.evaluate(sim.Scripted(policy), None, profiles, sim.Scripted(scripted_answer), protocol="sage",
                                 out_dir=str(tmp_path),
                                 log=lambda *a: None)
    transcripts = {t["profile_id"]: t for t in map(json.loads, open(tmp_path / "transcripts.jsonl"))}
    for pid, (changes, replies) in SCRIPTS.items():
        emo, user_turns, agent, reason = sage_reference(changes, replies)
        t = transcripts[pid]
        assert t["initial_emotion"] == 40 and t["final_emotion"] == emo and len(t["turns"]) == user_turns, pid
        assert t["end_reason"] == reason, pid
        assert all(abs(turn["change"]) <= 10 for turn in t["turns"])
        # SAGE's agent speaks once more after a full-length dialogue (never scored); we stop at the last scored
        assert agent == user_turns + (t["end_reason"] == "max_turns")
    assert [transcripts[p]["end_reason"] for p in SCRIPTS] == ["success", "failure", "goodbye", "max_turns",
                                                               "max_turns", "goodbye", "goodbye"]
    assert transcripts["up"]["final_emotion"] == 100 and len(transcripts["up"]["turns"]) == 6
    assert transcripts["down"]["final_emotion"] == 9 and transcripts["edge"]["final_emotion"] == 10
    assert (transcripts["byeup"]["final_emotion"], transcripts["byedown"]["final_emotion"]) == (100, 9)
    assert len(transcripts["flat"]["turns"]) == 9
    assert (summary["success"], summary["failure"], summary["dialogues"]) == (2, 2, 7)
    assert summary["score"] == pytest.approx((100 + 9 + 45 + 40 + 10 + 100 + 9) / 7)


# ---------------------------------------------------------------------------------------------------------
# 4. Two-stage protocol over real HTTP: the same dialogue as the rules backend in process, two calls a turn


def test_two_stage_protocol_against_the_http_server(simulator_server):
    client = sim.OpenAIBackend(simulator_server.url, api_key_env="RLVER_TEST_KEY", backoff=0.01)
    replies = ["听起来你真的很委屈。我在听，你愿意说说吗？", "嗯。", "你应该想开点，算了。"]
    eps = {}
    for name, backend in (("http", client), ("local", sim.RulesBackend())):
        (p,) = sim.prepare_profiles([zh_profile(emotion=None)], backend, protocol="sage")
        ep = sim.new_episode(p)
        for reply in replies:
            sim.simulate_turn([ep], [reply], backend, max_turns=9)
        eps[name] = ep
    assert eps["http"].turns == eps["local"].turns and eps["http"].emotion == eps["local"].emotion
    assert [t["emotion"] for t in eps["http"].turns][0] > 40   # started at SAGE's 40, warmth moved it up
    posts = [payload["messages"][-1]["content"] for _, payload in simulator_server.posts]
    assert len(posts) == 2 * len(replies)   # the profile had an opening: no opening request; 2 calls a turn
    assert [p.splitlines()[0] for p in posts[:2]] == ["步骤: analysis", "步骤: reply"]
    assert "等级 " in posts[1] and str(eps["http"].turns[0]["emotion"]) + " / 100" not in posts[1]  # band only
    # a garbled analysis is re-asked, alone, and the turn still counts
    simulator_server.plan = ["garbage"]
    before = len(simulator_server.posts)
    ep = sim.new_episode(sim.prepare_profiles([zh_profile()], client, protocol="sage")[0])
    sim.simulate_turn([ep], [replies[0]], client, max_turns=9)
    assert len(simulator_server.posts) - before == 3 and ep.parse_failures == 0 and ep.turns[0]["change"] > 0


def test_two_stage_parsers_are_strict():
    assert sim.parse_analysis_output("<thought>t</thought>\n<change>+15</change>") == ("t", 15)   # clamped later
    for bad in ("<thought>t</thought>", "<thought>t</thought><change>5.5</change>", "<change>+3</change>"):
        with pytest.raises(sim.ParseError):
            sim.parse_analysis_output(bad)
    assert sim.parse_reply_output("<thought>plan</thought>\n<reply>\n好吧。\n</reply>") == "好吧。"
    for bad in ("好吧。", "<reply>  </reply>"):
        with pytest.raises(sim.ParseError):
            sim.parse_reply_output(bad)
    assert sim.apply_change(95, 25, "sage") == (10, 100) and sim.apply_change(5, -25, "rlver") == (-25, 0)


# ---------------------------------------------------------------------------------------------------------
# 5. leaderboard: hand-made SAGE result records


def sage_record(pid, trajectory):
    history = [{"role": "user", "content": "开场", "emotion-point": trajectory[0]}]
    for e in trajectory[1:]:
        history += [{"role": "assistant", "content": "回复"},
                    {"role": "user", "content": "嗯", "emotion-point": e, "planning": {"change": 0}}]
    return {"id": pid, "emo_point": trajectory[-1], "emo_state": "Emotion-B", "target": "eq", "player": "p",
            "scene": "s", "character": "被动型", "topic": "t", "task": "k", "history": history}


def test_leaderboard_arithmetic(tmp_path):
    a = write_jsonl(tmp_path / "alpha_result.jsonl", [sage_record("s1", [40, 50, 100]), sage_record("s2", [40, 55]),
                                                      sage_record("s3", [40, 20, 5]), sage_record("s4", [40])])
    b = write_jsonl(tmp_path / "beta_result.jsonl", [sage_record("s1", [40, 61]), sage_record("s2", [40, 62]),
                                                     sage_record("s3", [40, 61]), sage_record("s4", [40, 61])])
    run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), "leaderboard", *args],
                                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    p = run(a, b, "--json")
    assert p.returncode == 0, p.stderr
    # beta: (61 + 62 + 61 + 61) / 4 = 61.25 -> 61.3 (round half up, as SAGE prints it); alpha: 200 / 4 = 50.0
    assert [{k: r[k] for k in ("name", "score", "success", "failure", "dialogues")} for r in json.loads(p.stdout)] == [
        {"name": "beta", "score": 61.3, "success": 0, "failure": 0, "dialogues": 4},
        {"name": "alpha", "score": 50.0, "success": 1, "failure": 1, "dialogues": 4}]
    plot = tmp_path / "curves.svg"
    p = run(a, b, "--versus", "alpha", "--plot", str(plot))
    assert p.returncode == 0, p.stderr
    assert "beta vs alpha: 3 wins, 0 ties, 1 losses on 4 scenarios" in p.stdout
    assert p.stdout.splitlines()[1].split()[:5] == ["beta", "61.3", "0", "0", "4"]
    lines = ET.parse(plot).getroot().findall(f"{SVG}polyline[@class='system']")
    assert [len(line.get("points").split()) for line in lines] == [3, 2]   # alpha: 3 user turns, beta: 2
    # alpha's mean per turn, an ended dialogue keeping its last value: [40, (50+55+20+40)/4, (100+55+5+40)/4]
    alpha = benchmark.read_system(a)
    assert benchmark.mean_trajectory([traj for _, _, traj, _ in alpha["dialogues"]]) == [40, 41.25, 50]
    assert run(a, str(tmp_path / "missing.jsonl")).returncode == 2
