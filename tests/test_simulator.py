"""Tests for simulator.py: profiles, the strict output format, the rules backend, whole episodes, the HTTP
backend against a real local server, and the local-model backend on a tiny random checkpoint."""
import json
import email.utils
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import closed_port

import simulator as S
from simulator import (OpenAIBackend, ParseError, ProfileError, RulesBackend, SimulatorError, build_request,
                       builtin_profiles, format_simulator_output, load_profiles, make_backend, new_episode,
                       parse_simulator_output, reward, simulate_turn)

WARM = ("I hear you. That sounds really hard, and I'm so sorry. It makes sense that you feel this way. "
        "What has been the hardest part for you?")
COLD = "Just calm down, whatever. At least it could be worse. You should move on, it's fine, stop the drama."
NEUTRAL = "The weather report says rain tomorrow afternoon in the north."   # no cue words at all


def ask_all(backend, requests, **wait):
    """The backend's answers to plain chat requests (lists of messages), all in flight at once."""
    return [text for text, _ in S.play_turns(backend, [S.ask(S.Request(m), str, 0) for m in requests], **wait)]


def run_episode(profile, replies, backend, mode="vanilla", max_turns=8):
    """Play one episode with scripted agent replies (the last one repeats)."""
    episode = new_episode(profile)
    while not episode.done:
        simulate_turn([episode], [replies[min(len(episode.turns), len(replies) - 1)]], backend, mode, max_turns)
    return episode


def profile(need="not_at_fault", emotion=50):
    """A small profile whose hidden intention names one need of the rules table."""
    intentions = {"not_at_fault": "You need to hear that this is not your fault.",
                  "listen": "You want to vent and be listened to.",
                  "practical": "You want practical help with concrete next steps."}
    return S.Profile(id=f"p-{need}", persona="Test Person, 40, a baker.", scenario="The oven broke.",
                     hidden_intention=intentions[need], opening="My oven broke again.", initial_emotion=emotion)


# ----------------------------------------------------------------------------------------------------
# Profiles

def test_builtin_profiles_are_many_distinct_and_varied():
    rules = RulesBackend()
    train, test = builtin_profiles("train"), builtin_profiles("test")
    assert len(train) >= 100 and len(test) >= 30
    everything = train + test
    for key in ("id", "persona", "scenario", "opening"):
        values = [getattr(p, key) for p in everything]
        assert len(set(values)) == len(values), f"duplicate {key}"
    assert len({p.initial_emotion for p in everything}) >= 5
    assert all(20 <= p.initial_emotion <= 60 for p in everything)
    assert len({p.id.split("-")[-1] for p in everything}) >= 8            # topics, from the id suffix
    assert len({p.traits[0] for p in everything}) >= 10                   # personalities
    needs = [rules.needs_of(p.hidden_intention) for p in everything]
    assert all(len(n) == 1 for n in needs), "every built-in profile should name exactly one hidden need"
    assert len({n[0] for n in needs}) == 8
    with pytest.raises(ValueError, match="unknown profile split"):
        builtin_profiles("dev")


def write_lines(tmp_path, lines, name="profiles.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                    encoding="utf-8")
    return path


def test_load_our_layout_defaults_and_aliases(tmp_path):
    path = write_lines(tmp_path, [
        {"id": "a", "persona": "P", "scenario": "S", "hidden_intention": "H", "opening": "Hi",
         "initial_emotion": 30, "traits": ["blunt"]},
        "",   # blank lines are skipped
        {"persona": "P2", "background": "S2", "hidden_intention": "H2", "topic": "Money"},
    ])
    a, b = load_profiles(path)
    assert (a.id, a.persona, a.scenario, a.hidden_intention, a.opening, a.initial_emotion, a.traits) == \
           ("a", "P", "S", "H", "Hi", 30, ["blunt"])
    # no initial_emotion: the protocol's start decides (classic 50, see test_protocol_start_emotions)
    assert (b.id, b.scenario, b.opening, b.initial_emotion, b.traits) == ("profiles-3", "S2", "Money", None, [])
    assert new_episode(b).emotion == 50


def test_load_public_rlver_layout_with_chinese_text(tmp_path):
    record = {"id": "3f2b9c1e-uuid", "player": "李明，32岁，程序员，说话简短。", "scene": "项目失败后被领导当众批评。",
              "main_cha": "消极", "cha_group": ["回避", "敏感"], "task": "你希望对方认真倾听你的倾诉。",
              "first_talk": "今天真是糟透了。"}
    (p,) = load_profiles(write_lines(tmp_path, [record]))
    assert (p.id, p.persona, p.scenario, p.hidden_intention, p.opening) == \
           ("3f2b9c1e-uuid", record["player"], record["scene"], record["task"], record["first_talk"])
    assert p.traits == ["消极", "回避", "敏感"] and p.initial_emotion is None and new_episode(p).emotion == 50
    assert RulesBackend().needs_of(p.hidden_intention) == ["listen"]
    request = build_request(new_episode(p), "我理解你。", "vanilla")   # Chinese text survives into the prompt
    assert record["scene"] in request[0]["content"] and record["first_talk"] in request[1]["content"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path, [{"persona": "P", "scenario": "S", "hidden_intention": "H", "opening": "O"},
                                  '{"persona": "P", "scenario": '])
    with pytest.raises(ProfileError, match=rf"{path}:2: not valid JSON"):
        load_profiles(path)
    with pytest.raises(ProfileError, match=r":1: expected a JSON object"):
        load_profiles(write_lines(tmp_path, ["[1, 2]"], "list.jsonl"))


def test_missing_keys_are_named(tmp_path):
    path = write_lines(tmp_path, [{"persona": "P", "scenario": "S"}])
    with pytest.raises(ProfileError, match=r":1: profile is missing key\(s\) hidden_intention, opening or topic"):
        load_profiles(path)
    path = write_lines(tmp_path, [{"player": "P", "scene": "S", "first_talk": "O"}], "public.jsonl")
    with pytest.raises(ProfileError, match=r"public\.jsonl:1: profile is missing key\(s\) task \(public RLVER"):
        load_profiles(path)
    with pytest.raises(ProfileError, match=r"'opening' must be a non-empty string"):
        load_profiles(write_lines(tmp_path, [{"persona": "P", "scenario": "S", "hidden_intention": "H",
                                              "opening": "  "}], "empty.jsonl"))


@pytest.mark.parametrize("emotion", [0, 100, 150, -5, 42.5, "high", True])
def test_bad_initial_emotion(tmp_path, emotion):
    path = write_lines(tmp_path, [{"persona": "P", "scenario": "S", "hidden_intention": "H", "opening": "O",
                                   "initial_emotion": emotion}])
    with pytest.raises(ProfileError, match=r":1: initial_emotion must be an integer in 1\.\.99"):
        load_profiles(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ProfileError, match=r"profile file not found: .*nope\.jsonl"):
        load_profiles(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ProfileError, match="no profiles"):
        load_profiles(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------------------------------
# The strict output format

GOOD = "<thought>\n(i) kind. (ii) better. (iii) say more.\n</thought>\n<change>+5</change>\n<reply>\nThanks.\n</reply>"


@pytest.mark.parametrize("text, change, reply", [
    (GOOD, 5, "Thanks."),
    ("<thought>t</thought><change>-3</change><reply>Hm.</reply>", -3, "Hm."),
    ("<thought>t</thought><change>7</change><reply>Ok</reply>", 7, "Ok"),
    ("  <THOUGHT> t </Thought>\n\n <Change>  + 4 </CHANGE>\n<Reply>\n  Fine, maybe.  \n</REPLY>  ", 4, "Fine, maybe."),
    ("<thought>t</thought><change>\u22124</change><reply>x</reply>", -4, "x"),            # unicode minus
    ("```xml\n<thought>t</thought>\n<change>+2</change>\n<reply>yes</reply>\n```", 2, "yes"),  # code fence
    ("```\n<thought>t</thought><change>+2</change>\n<reply>\nyes\n```", 2, "yes"),     # fenced, no </reply>
    ("Sure! Here is my answer:\n<thought>t</thought>\nnoise\n<change>1</change><reply>ok</reply>\nBye", 1, "ok"),
    ("<think>I will write <change>+30</change> maybe</think><thought>t</thought><change>-2</change>"
     "<reply>no</reply>", -2, "no"),                                                       # reasoning block
    ("<thought>t</thought><change>+3</change><reply>I was going to say", 3, "I was going to say"),  # truncated
    ("<thought>t</thought><change>+999</change><reply>wow</reply>", S.MAX_ABS_CHANGE, "wow"),  # clamped
    ("<thought>t</thought><change>-999</change><reply>bye</reply>", -S.MAX_ABS_CHANGE, "bye"),
    ("<thought></thought><change>0</change><reply>...</reply>", 0, "..."),                 # empty thought is ok
])
def test_parse_accepts(text, change, reply):
    _, parsed_change, parsed_reply = parse_simulator_output(text)
    assert (parsed_change, parsed_reply) == (change, reply)


@pytest.mark.parametrize("text, message", [
    ("<thought>t</thought><reply>hi</reply>", "missing section.*<change>"),
    ("<thought>t</thought><change>+1</change>", "missing section.*<reply>"),
    ("<change>+1</change><reply>hi</reply>", "missing section.*<thought>"),
    ("<thought>t</thought><change>5.5</change><reply>hi</reply>", "must be an integer"),
    ("<thought>t</thought><change>five</change><reply>hi</reply>", "must be an integer"),
    ("<thought>t</thought><change>+5 points</change><reply>hi</reply>", "must be an integer"),
    ("<thought>t</thought><change></change><reply>hi</reply>", "must be an integer"),
    ("<thought>t</thought><change>+1</change><reply>   </reply>", "empty <reply>"),
    ("asdf qwerty <<>> zxcv", "missing section"),
    ("", "missing section"),
    (None, "expected text"),
])
def test_parse_rejects(text, message):
    with pytest.raises(ParseError, match=message):
        parse_simulator_output(text)


def test_format_round_trips():
    text = format_simulator_output("(i) a (ii) b (iii) c", -7, "Fine.")
    assert parse_simulator_output(text) == ("(i) a (ii) b (iii) c", -7, "Fine.")
    assert "<change>+3</change>" in format_simulator_output("t", 3, "r")


# ----------------------------------------------------------------------------------------------------
# Rules backend scoring

def test_rules_scores_cues_in_the_documented_direction():
    rules, p = RulesBackend(), profile("listen")
    warm, _ = rules.score(WARM, p.hidden_intention, "vanilla")
    cold, hits = rules.score(COLD, p.hidden_intention, "vanilla")
    assert warm >= 5 and cold <= -5 and hits["dismissive"] >= 3
    assert rules.score(NEUTRAL, p.hidden_intention, "vanilla")[0] == 0
    assert rules.score(NEUTRAL, p.hidden_intention, "challenging")[0] == -2      # the demanding user drifts down
    assert rules.score(COLD, p.hidden_intention, "challenging")[0] < cold          # and punishes harder
    assert rules.score("ok", p.hidden_intention, "vanilla")[0] == -3              # brush-off
    assert rules.score("", p.hidden_intention, "vanilla")[0] == -3
    assert rules.score("and " * 130, p.hidden_intention, "vanilla")[0] == -2      # wall of text
    lecture = "You should call them. You must plan. You need to rest, and you have to eat."
    assert rules.score(lecture, p.hidden_intention, "vanilla")[1]["lecturing"] == 4


def test_rules_score_is_count_based_and_capped():
    rules, need = RulesBackend(), profile("listen").hidden_intention
    growing = ["the cat sat", "the cat sat you", "the cat sat you feel", "the cat sat you feel sorry",
               "the cat sat you feel sorry?", "the cat sat you feel sorry? what"]
    changes = [rules.score(r, need, "vanilla")[0] for r in growing]
    assert changes == sorted(changes) and len(set(changes)) == len(changes), changes   # each cue adds a point
    assert rules.score("the cat sat you you you you", need, "vanilla") == rules.score("the cat sat you you", need, "vanilla")
    flood = " ".join(["you feel sorry understand hard tough care? what how, tell me more"] * 5)
    assert rules.score(flood, need, "vanilla")[0] == 10 and rules.score(flood, need, "challenging")[0] == 8
    awful = " ".join(["just whatever relax calm down should must obviously"] * 5)
    assert rules.score(awful, need, "vanilla")[0] == -10 and rules.score(awful, need, "challenging")[0] == -15


def test_rules_need_bonus_only_for_the_matching_need():
    rules = RulesBackend()
    reply = "It was not your fault, and nobody would blame you for that."
    on_need, hits = rules.score(reply, profile("not_at_fault").hidden_intention, "vanilla")
    off_need, _ = rules.score(reply, profile("practical").hidden_intention, "vanilla")
    assert hits["need"] == 2 and on_need == off_need + 4   # +3 for the first need cue, +1 for the second


def test_rules_rewards_are_learnable_from_token_soup():
    """A random policy's word soup must give different rewards inside a group of 4 rollouts (else GRPO
    has nothing to learn from), and soup richer in cue words must earn more."""
    words = " ".join(p.scenario + " " + p.hidden_intention for p in builtin_profiles("train")).split()
    cues = ["you", "feel", "sorry", "understand", "hear", "?"]
    rng, rules, profiles = random.Random(0), RulesBackend(), builtin_profiles("train")

    def group(p, cue_rate):
        rewards = []
        for _ in range(4):
            episode = new_episode(p)
            while not episode.done:
                soup = " ".join(rng.choice(cues) if rng.random() < cue_rate else rng.choice(words) for _ in range(12))
                simulate_turn([episode], [soup], rules, max_turns=4)
            rewards.append(reward(episode))
        return rewards

    plain = [group(p, 0.0) for p in profiles[:20]]
    rich = [group(p, 0.3) for p in profiles[:20]]
    assert sum(statistics.pstdev(g) > 0 for g in plain) >= 12
    assert statistics.mean(map(statistics.mean, rich)) > statistics.mean(map(statistics.mean, plain)) + 0.05


def test_rules_backend_rejects_foreign_requests():
    with pytest.raises(SimulatorError, match="only understands requests made by simulator.build_request"):
        ask_all(RulesBackend(), [[{"role": "system", "content": "hi"}, {"role": "user", "content": "hello"}]])
    episode = new_episode(profile())
    official = S.Request(build_request(episode, WARM), "analysis", emotion=50, reply=WARM, official=True)
    with pytest.raises(SimulatorError, match="only understands requests made by simulator.build_request"):
        RulesBackend().submit(official).result()
    with pytest.raises(SimulatorError, match="cannot load rules cue file"):
        RulesBackend(cues_path="/nonexistent/cues.json")


# ----------------------------------------------------------------------------------------------------
# The rules a Protocol drives

def test_outcome_and_end_follow_the_protocols_lines(monkeypatch):
    # a game of our own: start 50, success at 80, failure below 20, 5 turns
    monkeypatch.setitem(S.PROTOCOLS, "lenient", S.Protocol(50, 10, 80, 20, (), 5, 1))
    assert [S.final_outcome(e, "lenient") for e in (19, 20, 79, 80, 95)] == ["failure", None, None, "success",
                                                                              "success"]
    assert [S.dialogue_end(e, 2, 5, "", "lenient") for e in (19, 79, 80)] == ["failure", None, "success"]
    assert S.dialogue_end(79, 5, 5, "", "lenient") == "max_turns"
    # rlver counts 100 as a success but plays on (its user says goodbye)
    assert S.final_outcome(100, "rlver") == "success" and S.dialogue_end(100, 3, 9, "嗯", "rlver") is None
    assert S.dialogue_end(100, 3, 9, "好的，再见", "rlver") == "goodbye"


def test_parse_health_counts_warns_and_stops():
    profile_ = S.Profile("p", "x", "x", "x", "hi", initial_emotion=50)
    turns = [{"parse_failed": k == 1, "thought": f"note {k}"} for k in range(4)]   # 1 of 4 unparseable
    episodes = [S.Episode(profile_, 50, [], turns[:2]), S.Episode(profile_, 50, [], turns[2:])]
    lines = []
    assert S.check_parse_health(episodes, 0.25, "step 1", lines.append) == (1, 4)
    assert lines == ["warning: step 1: 1/4 simulator turns were unparseable (scored change 0, the policy saw a "
                     "fallback user line); e.g. note 1"]
    assert S.check_parse_health(episodes, 0.25, "step 1", sum_ranks=lambda n: 2 * n) == (2, 8)   # two alike ranks
    with pytest.raises(SimulatorError, match=r"^step 1: 1/4 simulator turns were unparseable \(more than "
                                             r"--max-parse-failure-rate 0.2\)"):
        S.check_parse_health(episodes, 0.2, "step 1")


# ----------------------------------------------------------------------------------------------------
# Whole episodes with the rules backend

def test_episode_reaches_100_with_warm_replies():
    episode = run_episode(profile(emotion=60), [WARM], RulesBackend())
    assert episode.done and episode.end_reason == "success" and episode.emotion == 100
    assert reward(episode) == 1.0 and len(episode.turns) < 8 and episode.parse_failures == 0
    emotion = 60
    for turn in episode.turns:   # reward arithmetic: the code clamps emotion + change into [0, 100]
        emotion = max(0, min(100, emotion + turn["change"]))
        assert turn["emotion"] == emotion and turn["agent"] == WARM and turn["thought"].startswith("(i)")
    assert episode.turns[-1]["user"] in RulesBackend().table["replies"]["helped"]


def test_episode_reaches_0_with_cold_replies():
    episode = run_episode(profile(emotion=40), [COLD], RulesBackend(), mode="challenging")
    assert episode.end_reason == "failure" and episode.emotion == 0 and reward(episode) == 0.0
    assert all(t["change"] == -15 for t in episode.turns) and len(episode.turns) == 3   # 40 -> 25 -> 10 -> 0


def test_episode_stops_at_max_turns():
    episode = run_episode(profile(emotion=45), [NEUTRAL], RulesBackend(), max_turns=3)
    assert episode.end_reason == "max_turns" and len(episode.turns) == 3 and episode.emotion == 45
    assert reward(episode) == 0.45
    episode = run_episode(profile(emotion=45), [NEUTRAL], RulesBackend())
    assert len(episode.turns) == 8   # default max_turns


def test_episodes_are_deterministic_and_independent_of_batching():
    profiles = builtin_profiles("test")[:4]
    options = [WARM, NEUTRAL, COLD, "Tell me more? I hear you."]
    replies = [[options[(i + t) % 4] for t in range(8)] for i in range(4)]

    def play(batch):
        episodes = [new_episode(profiles[i]) for i in batch]
        for t in range(8):
            simulate_turn(episodes, [replies[i][t] for i in batch], RulesBackend(), max_turns=8)
        return episodes

    first, second, alone = play(range(4)), play(range(4)), play([2])
    assert first == second
    assert first[2] == alone[0]
    assert len({tuple(t["user"] for t in e.turns) for e in first}) > 1


def test_messages_turns_and_think_stripping():
    seen = []

    class Recording(RulesBackend):   # the real rules backend, its requests' messages recorded
        def submit(self, request):
            seen.append(request.messages)
            return super().submit(request)

    recording_rules = Recording()

    done, active = new_episode(profile()), new_episode(profile("listen"))
    done.done = True
    raw = "<think>the user seems to blame herself</think> I hear you. It is not your fault."
    out = simulate_turn([done, active], [None, raw], recording_rules)
    assert len(seen) == 1 and out[0] is None and out[1] == active.turns[0]["user"]
    assert "blame herself" not in seen[0][1]["content"] and "It is not your fault." in seen[0][1]["content"]
    assert active.turns[0]["agent"] == "I hear you. It is not your fault."
    assert [m["role"] for m in active.messages] == ["user", "assistant", "user"]
    assert active.messages[0]["content"] == "My oven broke again." and active.messages[1]["content"] == raw
    assert set(active.turns[0]) == {"turn", "agent", "thought", "change", "emotion", "user", "parse_failed"}
    # the second request carries the dialogue so far
    simulate_turn([active], ["Tell me more?"], recording_rules)
    assert "Supporter: I hear you. It is not your fault." in seen[-1][1]["content"]
    # a reply cut inside its <think> has nothing to show: the dialogue ends there (counted), the simulator is
    # not asked and the user never sees an empty message
    asked = len(seen)
    assert simulate_turn([active], ["<think>still thinking"], recording_rules) == [None]
    assert len(seen) == asked and len(active.turns) == 2 and active.done
    assert (active.end_reason, active.cut_thoughts) == ("thought_cut", 1)


def test_emotion_is_clamped_by_code_not_the_simulator():
    # the simulator writes changes beyond the classic protocol's +-30: the code clamps the change, then caps the
    # emotion at 100 and floors it at 0 (start, written change) -> (applied change, emotion). (The one-call
    # parser clamps to +-30 as well; the protocol's own clamp alone is caught by the SAGE loop's +25 changes.)
    for (start, written), want in {(50, 45): (30, 80), (50, -45): (-30, 20), (90, 45): (30, 100),
                                   (20, -45): (-30, 0)}.items():
        episode = new_episode(profile(emotion=start))
        simulate_turn([episode], ["hi"], S.Scripted(lambda messages: format_simulator_output("t", written, "Y")))
        assert (episode.turns[0]["change"], episode.emotion) == want, (start, written)
        assert episode.end_reason == {100: "success", 0: "failure"}.get(want[1])


def test_unparseable_output_is_retried_then_counted():
    calls = []

    def flaky(messages):   # garbage for the first two requests (each episode's first ask), good answers afterwards
        calls.append(messages[-1]["content"])
        return "nonsense" if len(calls) <= 2 else GOOD

    episodes = [new_episode(profile()), new_episode(profile())]
    simulate_turn(episodes, ["a", "b"], S.Scripted(flaky))
    assert len(calls) == 4 and all(e.parse_failures == 0 and e.emotion == 55 for e in episodes)

    calls.clear()

    def half_garbage(messages):   # the first episode's requests (its reply "a") always fail: only it is re-asked
        calls.append(messages[-1]["content"])
        return "nonsense" if "reply\na\n" in calls[-1] else GOOD

    episodes = [new_episode(profile()), new_episode(profile())]
    returned = simulate_turn(episodes, ["a", "b"], S.Scripted(half_garbage), retries=2)
    assert ["reply\na\n" in c for c in calls] == [True, False, True, True]   # asked 1 + 2 times, the other once
    bad, good = episodes
    assert (bad.parse_failures, bad.emotion, bad.turns[0]["change"], bad.turns[0]["parse_failed"]) == (1, 50, 0, True)
    assert "missing section" in bad.turns[0]["thought"] and returned[0] == S.FALLBACK_REPLY["en"]
    assert not bad.done and good.parse_failures == 0 and good.emotion == 55
    simulate_turn(episodes, ["c", "d"], S.Scripted(lambda messages: "still nonsense"), retries=0)
    assert bad.parse_failures == 2 and len(bad.turns) == 2     # counted, never raised


def test_simulate_turn_rejects_user_mistakes():
    episode = new_episode(profile())
    with pytest.raises(ValueError, match="unknown simulator mode 'hard'"):
        simulate_turn([episode], ["hi"], RulesBackend(), mode="hard")
    with pytest.raises(ValueError, match="got 2 agent replies for 1 episodes"):
        simulate_turn([episode], ["hi", "there"], RulesBackend())
    def broken(messages):
        raise SimulatorError("the backend broke")

    with pytest.raises(SimulatorError, match="the backend broke"):   # a backend's error reaches the caller
        simulate_turn([episode], ["hi"], S.Scripted(broken))
    with pytest.raises(ValueError, match="need max_turns >= 1"):
        simulate_turn([episode], ["hi"], RulesBackend(), max_turns=0)
    episode.done = True   # nothing left to simulate: the backend is not called at all

    def never(messages):
        raise AssertionError("backend called for finished episodes")

    assert simulate_turn([episode], ["hi"], S.Scripted(never)) == [None] and len(episode.turns) == 0


def test_make_backend(tmp_path):
    assert isinstance(make_backend("rules"), RulesBackend)
    backend = make_backend("http://127.0.0.1:9/v1", model_name="m", timeout=3)
    assert isinstance(backend, OpenAIBackend) and backend.url == "http://127.0.0.1:9/v1/chat/completions"
    assert backend.model == "m" and backend.timeout == 3
    assert OpenAIBackend("http://h:1").url == "http://h:1/v1/chat/completions"
    assert OpenAIBackend("https://h/api/v1/chat/completions/").base == "https://h/api/v1"
    with pytest.raises(ValueError, match=r"unknown simulator .*use 'rules', an http\(s\):// URL"):
        make_backend(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        OpenAIBackend("localhost:8000/v1")


# ----------------------------------------------------------------------------------------------------
# OpenAIBackend against a real HTTP server on 127.0.0.1

@pytest.fixture
def server(simulator_server):   # tests/conftest.py: a real OpenAI-compatible server on 127.0.0.1
    return simulator_server


def http_backend(server, **kwargs):
    kwargs = {"api_key_env": "RLVER_TEST_KEY", "backoff": 0.01, "timeout": 5.0, **kwargs}
    return OpenAIBackend(server.url, **kwargs)


def test_http_episodes_match_rules_and_send_bearer_key(server):
    backend = http_backend(server)
    backend.check()
    assert backend.model == "sim-model"                     # resolved from GET /models
    profiles = builtin_profiles("test")[:3]
    replies = [WARM, COLD, "Tell me more? I hear you."]
    via_http, direct = [new_episode(p) for p in profiles], [new_episode(p) for p in profiles]
    for _ in range(3):
        simulate_turn(via_http, replies, backend)
        simulate_turn(direct, replies, RulesBackend())
    assert via_http == direct
    assert all(h["Authorization"] == f"Bearer {server.key}" and p["model"] == "sim-model" for h, p in server.posts)
    assert build_request(new_episode(profiles[0]), WARM, "vanilla") in [p["messages"] for _, p in server.posts]
    assert len(server.posts) == 9 and server.key not in repr(backend)


def test_http_retries_5xx_then_succeeds(server):
    server.plan = ["500", "500", "ok"]
    (answer,) = ask_all(http_backend(server, max_retries=3), [build_request(new_episode(profile()), WARM)])
    assert parse_simulator_output(answer)[1] > 0 and len(server.posts) == 3


def test_http_gives_up_after_retries_without_leaking_the_key(server):
    server.default = "500"
    backend = http_backend(server, max_retries=2)
    with pytest.raises(SimulatorError, match=r"failed after 3 attempts: HTTP 500") as error:
        ask_all(backend, [build_request(new_episode(profile()), WARM)])
    assert len(server.posts) == 3 and server.key not in str(error.value)


def test_http_client_errors_are_not_retried(server):
    server.plan = ["400"]
    with pytest.raises(SimulatorError, match=r"refused the request \(HTTP 400"):
        ask_all(http_backend(server, model="x"), [build_request(new_episode(profile()), WARM)])
    assert len(server.posts) == 1


def test_http_timeout_is_retried(server):
    server.plan, server.slow_s = ["slow", "ok"], 2.0
    (answer,) = ask_all(http_backend(server, timeout=0.6, model="x"), [build_request(new_episode(profile()), WARM)])
    assert parse_simulator_output(answer) and len(server.posts) == 2


def test_http_garbage_is_parse_retried_then_counted(server):
    server.default = "garbage"
    episode = new_episode(profile())
    simulate_turn([episode], [WARM], http_backend(server, model="x"), retries=2)
    assert len(server.posts) == 3 and episode.parse_failures == 1 and episode.emotion == 50
    assert episode.turns[0]["user"] == S.FALLBACK_REPLY["en"] and not episode.done
    server.plan = ["garbage", "ok"]
    server.posts.clear()
    episode = new_episode(profile())
    simulate_turn([episode], [WARM], http_backend(server, model="x"), retries=2)
    assert len(server.posts) == 2 and episode.parse_failures == 0 and episode.emotion > 50


def test_http_requests_run_concurrently(server):
    server.sleep_s = 0.2
    requests = [build_request(new_episode(p), WARM) for p in builtin_profiles("test")[:8]]
    ask_all(http_backend(server, model="x", concurrency=8), requests)
    assert server.max_inflight >= 4
    server.max_inflight = 0
    ask_all(http_backend(server, model="x", concurrency=1), requests[:3])
    assert server.max_inflight == 1


def test_http_check_unreachable_port_gives_one_clear_line():
    port = closed_port()   # a port that nothing listens on
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", timeout=2)
    with pytest.raises(SimulatorError) as error:
        backend.check()
    message = str(error.value)
    assert message.startswith(f"cannot reach simulator endpoint http://127.0.0.1:{port}/v1/chat/completions: ")
    assert message.endswith("start the server or pass --simulator rules") and "\n" not in message


def test_http_key_never_appears_in_errors_or_repr(server, monkeypatch):
    server.plan = ["echo401"]   # this server even echoes the Authorization header back in its error body
    backend = http_backend(server, model="x")
    with pytest.raises(SimulatorError, match=r"HTTP 401.*check the API key in \$RLVER_TEST_KEY") as error:
        ask_all(backend, [build_request(new_episode(profile()), WARM)])
    assert server.key not in str(error.value) and "***" in str(error.value)
    assert server.key not in repr(backend) and "RLVER_TEST_KEY" in repr(backend)
    monkeypatch.setenv("RLVER_TEST_KEY", "wrong-key")
    with pytest.raises(SimulatorError, match=r"rejected the request \(HTTP 401\); put a valid API key") as error:
        http_backend(server).check()
    assert "wrong-key" not in str(error.value)
    assert server.gets[-1]["Authorization"] == "Bearer wrong-key"


def test_retry_after_header_seconds_and_http_dates():
    now = 1445412470.0   # Wed, 21 Oct 2015 07:27:50 GMT
    assert S.retry_after_seconds("3", now) == 3.0 and S.retry_after_seconds(" 1.5 ", now) == 1.5
    assert S.retry_after_seconds("-2", now) == 0.0
    assert S.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now) == 10.0
    assert S.retry_after_seconds("Wed, 21 Oct 2015 07:00:00 GMT", now) == 0.0    # already past
    for unreadable in (None, "", "soon", "nan", "Someday, 99 Foo 2015"):
        assert S.retry_after_seconds(unreadable, now) is None


@pytest.mark.parametrize("header", ["1", "http-date"])
def test_http_429_waits_for_retry_after(server, header):
    # an HTTP date has one-second resolution: "now + 2 s", truncated, is 1..2 s away
    server.retry_after = email.utils.formatdate(time.time() + 2, usegmt=True) if header == "http-date" else header
    server.plan = ["429", "ok"]
    (answer,) = ask_all(http_backend(server, model="x"), [build_request(new_episode(profile()), WARM)])   # backoff 0.01
    assert parse_simulator_output(answer)[1] > 0 and len(server.posts) == 2
    assert 0.9 <= server.post_times[1] - server.post_times[0] < 3.0


def test_http_retry_after_is_capped_by_max_wait(server):
    server.plan, server.retry_after = ["429", "ok"], "3600"
    ask_all(http_backend(server, model="x", max_wait=0.3), [build_request(new_episode(profile()), WARM)])
    assert len(server.posts) == 2 and 0.25 <= server.post_times[1] - server.post_times[0] < 2.0


def test_http_turn_deadline_fires_on_a_server_that_never_answers(hanging_simulator_server):
    server, lines = hanging_simulator_server, []
    server.plan = ["ok"]   # one request is answered, the other two hang forever
    backend = http_backend(server, model="x", timeout=30)
    requests = [build_request(new_episode(p), WARM) for p in builtin_profiles("test")[:3]]
    start = time.monotonic()
    with pytest.raises(SimulatorError, match=rf"^simulator endpoint {server.url}/chat/completions: only 1/3 "
                                             rf"requests answered within the turn deadline of 1.2 s .*"
                                             rf"raise --simulator-turn-deadline$"):
        ask_all(backend, requests, turn_deadline=1.2, progress_every=0.5, log=lines.append)
    assert 1.2 <= time.monotonic() - start < 3.0 and len(server.posts) == 3
    assert 1 <= len(lines) <= 3 and all(re.fullmatch(r"simulator: 1/3 answered, \d+ s", l) for l in lines), lines


def test_garbage_server_marks_every_turn_parse_failed(garbage_simulator_server):
    episodes = [new_episode(p) for p in builtin_profiles("test")[:2]]
    for _ in range(2):
        simulate_turn(episodes, [WARM, COLD], http_backend(garbage_simulator_server, model="x"), retries=1)
    assert all(t["parse_failed"] for e in episodes for t in e.turns) and [len(e.turns) for e in episodes] == [2, 2]
    assert len(garbage_simulator_server.posts) == 2 * 2 * 2   # episodes x turns x (1 + 1 retry)


# A separate Python process calls a server whose requests never come back. Neither the per-request timeout
# nor the turn deadline (both 60 s) may keep it alive: pending requests must not be joined at exit.
HANGING_CLIENT = """
import sys, simulator
backend = simulator.OpenAIBackend(sys.argv[1], model="x", timeout=60, max_retries=0)
asks = [simulator.ask(simulator.Request([{"role": "user", "content": "hi"}]), str, 0) for _ in range(2)]
try:
    simulator.play_turns(backend, asks, turn_deadline=float(sys.argv[2]), progress_every=0)
except simulator.SimulatorError as e:
    print("deadline:", e)
"""


@pytest.mark.parametrize("ending", ["ctrl-c", "deadline"])
def test_pending_requests_never_hold_up_exit(hanging_simulator_server, ending):
    server = hanging_simulator_server
    proc = subprocess.Popen([sys.executable, "-c", HANGING_CLIENT, server.url, "60" if ending == "ctrl-c" else "1"],
                            cwd=S.PROMPTS_DIR.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        give_up = time.monotonic() + 20
        while len(server.posts) < 2 and time.monotonic() < give_up:   # both requests are now pending
            time.sleep(0.05)
        assert len(server.posts) == 2
        if ending == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=15)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if ending == "ctrl-c":   # an unhandled KeyboardInterrupt ends Python by SIGINT (or exit status 130)
        assert proc.returncode in (-signal.SIGINT, 130) and "KeyboardInterrupt" in err and took < 5, (took, err)
    else:
        assert proc.returncode == 0 and "only 0/2 requests answered" in out and took < 5, (took, out, err)


# ----------------------------------------------------------------------------------------------------
# LocalModelBackend on a tiny random checkpoint (model.py)

def gated_answers(backend, requests):
    """The backend's answers, batched deterministically: the first request runs alone while the others are
    submitted (a forward pre-hook holds its first forward until they are). Returns (texts, the rows of each
    generate call: its first forward, the prefill, is the only one with more than one column)."""
    rows, submitted = [], threading.Event()

    def hook(module, args):
        if args[0].shape[1] > 1:
            rows.append(args[0].shape[0])
            submitted.wait(30) if len(rows) == 1 else None
    handle = backend.model.register_forward_pre_hook(hook)
    try:
        futures = [backend.submit(S.Request(requests[0]))]
        while not rows:   # the worker is inside its first forward, with the first request alone
            time.sleep(0.01)
        futures += [backend.submit(S.Request(m)) for m in requests[1:]]
        submitted.set()
        return [f.result(timeout=60) for f in futures], rows
    finally:
        handle.remove()


def test_local_model_backend_batches_what_is_pending(tiny_qwen2):
    from model import generate, load_model, load_tokenizer, stop_token_ids
    backend = make_backend(tiny_qwen2, max_new_tokens=6, temperature=1.0, seed=0, batch_size=2)
    assert isinstance(backend, S.LocalModelBackend)
    requests = [[{"role": "system", "content": "Be a user."}, {"role": "user", "content": f"Hello {i}"}]
                for i in range(4)]
    outputs, rows = gated_answers(backend, requests)
    assert rows == [1, 2, 1]   # the three submitted while the first ran: one batch of batch_size, then the last
    # the independent reference: model.generate of the same prompts in those batches, one generator seeded alike
    model, tokenizer = load_model(tiny_qwen2), load_tokenizer(tiny_qwen2)
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in requests]
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    generator, want = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for batch in (prompts[:1], prompts[1:3], prompts[3:]):
            ids, _ = generate(model, batch, 6, stop_token_ids(tokenizer), temperature=1.0,
                              generator=generator)
            want += [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    assert outputs == want and all(isinstance(o, str) for o in outputs)
    again = S.LocalModelBackend(model, tokenizer, max_new_tokens=6, temperature=1.0, seed=0, batch_size=2)
    other = S.LocalModelBackend(model, tokenizer, max_new_tokens=6, temperature=1.0, seed=1, batch_size=2)
    assert gated_answers(again, requests)[0] == outputs and gated_answers(other, requests)[0] != outputs
    # the random model cannot follow the format: retried, then counted, and the episode goes on
    episode = new_episode(builtin_profiles("test")[0])
    simulate_turn([episode], [WARM], S.LocalModelBackend(model, tokenizer, max_new_tokens=4), retries=1)
    assert episode.parse_failures == 1 and episode.emotion == episode.profile.initial_emotion
    assert not episode.done and episode.turns[0]["user"] == S.FALLBACK_REPLY["en"]
