"""benchmark.py replay: SAGE's published result files played back through the eval loop, with no LLM.

The result files here are SYNTHETIC, our own dialogues written in the published layout (test_npc.py's records:
the agent's replies, per user turn the simulator's planning with its change, thinking, reply and emotion-point),
and they are replayed through test_official's synthetic checkout. Every emotion-point below is worked out by
hand from SAGE's rules: start 40, a change clamped to +-10, capped at 100; the dialogue ends on a goodbye word
(checked first), at >= 100 or below 10, or after 9 scored replies (its 10th reply is never judged)."""
import json

import pytest

from test_official import checkout, cli, profile  # noqa: F401 (checkout: the synthetic official-layout fixture)

import benchmark

# (agent reply, change as the simulator wrote it, the simulator's reply, emotion-point by hand) per user turn
DIALOGUES = {
    # a change outside +-10 (+15 counts +10), 95 + 10 capped at 100: success after 7 turns
    "p0": [("I hear you.", "+15", "yes", 50), ("Go on.", "+10", "ok", 60), ("That hurts.", "+10", "it does", 70),
           ("You did your best.", "+10", "maybe", 80), ("It was not your fault.", "+8", "thanks", 88),
           ("Anyone would be shaken.", "+7", "true", 95), ("I am here.", "+10", "I feel better", 100)],
    # a goodbye on the turn that also crosses the failure line (7 < 10): ends there
    "p1": [("Calm down.", "-10", "hm", 30), ("Just sleep.", "-10", "no", 20), ("Whatever.", "-5", "...", 15),
           ("You should quit.", "-8", "好吧，再见", 7)],
    # an empty agent reply (turn 2) and an empty simulator reply (turn 3); ended by the reply count: 9 scored
    # replies, then the 10th reply that SAGE's loop sends and never judges
    "p2": [("Hello.", "+2", "hi", 42), ("", "-3", "you there?", 39), ("Sorry.", "+1", "", 40), ("Tell me.", "0", "well", 40),
           ("I see.", "+4", "yes", 44), ("Hmm.", "-2", "so", 42), ("Go on.", "+3", "and", 45), ("Right.", "+1", "ok", 46),
           ("Yes.", "+2", "fine", 48), ("(the 10th reply)", None, None, None)],
    # a change below -10 (-20 counts -10) and a goodbye word that ends the dialogue above the failure line
    "p3": [("Nice weather.", "+5", "sure", 45), ("Cheer up!", "-20", "拜拜", 35)],
}
PUBLISHED = {"score": (100 + 7 + 48 + 35) / 4, "success": 1, "failure": 1}   # finals 100, 7, 48, 35


def record(pid, turns):
    """A SAGE result record (test_npc.py's player_data) of one scripted dialogue of profile(i)."""
    p = profile(int(pid[1:]))
    history = [{"role": "user", "content": p["first_talk"], "emotion-point": 40}]
    for k, (agent, change, reply, emotion) in enumerate(turns):
        history.append({"role": "assistant", "content": agent})
        if reply is not None:
            history.append({"role": "user", "content": reply, "thinking": f"plan {k}", "emotion-point": emotion,
                            "planning": {"activity": f"act {k}", "TargetCompletion": f"tc {k}",
                                         "content": f"c {k}", "analyse": f"an {k}", "change": change}})
    final = [e for _, _, _, e in turns if e is not None][-1]
    return {"id": pid, "emo_point": final, "emo_state": "Emotion-B", "target": "eq", "player": p["player"],
            "scene": p["scene"], "character": p["main_cha"], "topic": "work", "task": p["task"], "history": history}


@pytest.fixture
def published(checkout, tmp_path):   # noqa: F811
    """The synthetic result file in its published place, and the checkout's scenarios = its 4 profiles."""
    (checkout / "SAGE/profile/simulator_profile_withfirsttalk.jsonl").write_text(
        "".join(json.dumps(profile(i)) + "\n" for i in range(4)), encoding="utf-8")
    path = tmp_path / "dataset" / "deepseek-v3-2024-1227_based_simulator" / "synth_result.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(record(pid, turns), ensure_ascii=False) + "\n"
                            for pid, turns in DIALOGUES.items()), encoding="utf-8")
    return path


def test_replay_reproduces_a_published_file(checkout, published):   # noqa: F811
    r = cli("benchmark.py", "replay", str(published), "--official-prompts", str(checkout))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    row = f"Score {benchmark.round_half_up(PUBLISHED['score']):.1f}  Success 1  Failure 1  (4 dialogues)"
    assert lines[1] == f"  published  {row}" and lines[2] == f"  replayed   {row}"
    assert lines[3] == "  reproduced: every scenario's emotion and reply after every turn"
    assert lines[4] == "replay: 1/1 files reproduce"


def test_replay_names_the_scenario_and_turn_where_a_file_parts(checkout, published, capsys):   # noqa: F811
    records = [json.loads(line) for line in published.read_text().splitlines()]
    records[1]["history"][6]["emotion-point"] = 19   # p1's 3rd user turn: 20 - 5 is 15, not 19
    records[3]["emo_point"] = 40                     # p3: the record's final is not its transcript's
    bad = published.with_name("bad_result.jsonl")
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(SystemExit) as e:   # (in process: the CLI's main; the run above is a subprocess)
        benchmark.main(["replay", str(published), str(bad), "--official-prompts", str(checkout)])
    out = capsys.readouterr().out
    assert e.value.code == 1 and out.endswith("replay: 1/2 files reproduce\n")
    differ = out.split(str(bad))[1].splitlines()[3:5]
    assert differ[0] == ("  p1: published final 7 after 4 turns, replayed 7 after 4; they part at turn 3: "
                         "published [(19, '...')], replayed [(15, '...')]")
    assert differ[1] == ("  p3: published final 40 after 2 turns, replayed 35 after 2; every turn agrees, but the "
                         "record's emo_point 40 is not its last emotion-point")


def test_replay_refuses_a_file_not_in_the_published_layout(checkout, published, tmp_path, capsys):   # noqa: F811
    records = [json.loads(line) for line in published.read_text().splitlines()]
    del records[2]["history"][4]["planning"]
    bad = tmp_path / "bad_result.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SystemExit) as e:
        benchmark.main(["replay", str(bad), "--official-prompts", str(checkout)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "record 'p2' is not a SAGE published" in err


def _edit(path, old, new):
    path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")


@pytest.mark.parametrize("edit, message", [
    (lambda root, result: _edit(result, '"id": "p3"', '"id": "p9"'), "scenario p9 is not among the checkout's"),
    (lambda root, result: _edit(root / "SAGE/profile/simulator_profile_withfirsttalk.jsonl", "scene 1:", "scene 0:"),
     "two of the checkout's scenarios share one"),
    (lambda root, result: _edit(root / "SAGE/simulator_response.py", "SYNTH-REPLY: answer in character.\n",
                                "SYNTH-ANALYSIS: judge how the reply lands.\n# purpose\n"), "templates start alike"),
    (lambda root, result: _edit(root / "SAGE/simulator_response.py", "# scene\n{{simulator_scene}}", ""),
     "a simulator request holds 0 of the scenarios' scenes"),
])
def test_replay_refuses_what_it_cannot_tell_apart(checkout, published, edit, message, capsys):   # noqa: F811
    edit(checkout, published)
    with pytest.raises(SystemExit) as e:
        benchmark.main(["replay", str(published), "--official-prompts", str(checkout)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
