"""benchmark.py: score arithmetic by hand, the report files, eval end to end (fake endpoint, tiny local model),
the speed and rollout tables, what importing benchmark loads, and one-line CLI errors."""
import http.server
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT, closed_port

import benchmark
import simulator as sim

SVG = "{http://www.w3.org/2000/svg}"


def episode(final_emotion, emotions, pid="p", initial=50):
    """A finished simulator.Episode with a given emotion trajectory (what simulate_turn would have recorded)."""
    profile = sim.Profile(id=pid, persona="x", scenario="x", hidden_intention="x", opening="hi",
                          initial_emotion=initial)
    turns = [{"turn": i + 1, "agent": "a", "thought": "t", "change": 0, "emotion": e, "user": "u",
              "parse_failed": False} for i, e in enumerate(emotions)]
    end = sim.dialogue_end(final_emotion, len(emotions), len(emotions), "", "classic")
    return sim.Episode(profile=profile, emotion=final_emotion, messages=[], turns=turns, done=True, end_reason=end)


# ---------------------------------------------------------------------------------------------------------
# score arithmetic


def test_score_on_known_trajectories():
    episodes = [episode(100, [60, 80, 100]),  # success after 3 turns
                episode(0, [30, 0]),  # the user left after 2 turns
                episode(62, [52, 55, 58, 60, 61, 62, 62, 62])]  # ran to 8 turns
    s = benchmark.summarize(episodes)
    assert s["score"] == pytest.approx(54.0)  # (100 + 0 + 62) / 3
    assert s["success_rate"] == pytest.approx(1 / 3) and s["failure_rate"] == pytest.approx(1 / 3)
    assert s["mean_turns"] == pytest.approx((3 + 2 + 8) / 3)
    assert s["dialogues"] == 3
    assert sim.trajectory(episodes[1]) == [50, 30, 0]
    # only the bounds count: 99 is not a success and 1 is not a failure
    near = benchmark.summarize([episode(99, [99]), episode(1, [1])])
    assert (near["score"], near["success_rate"], near["failure_rate"]) == (50.0, 0.0, 0.0)


def test_seeds_give_mean_and_std(tmp_path):
    # seed 0: finals 100, 40 -> 70; seed 1: 20, 60 -> 40; seed 2: 50, 50 -> 50
    finals = {0: [100, 40], 1: [20, 60], 2: [50, 50]}
    episodes, seeds = [], []
    for seed, fs in finals.items():
        for i, f in enumerate(fs):
            episodes.append(episode(f, [f], pid=f"p{i}"))
            seeds.append(seed)
    s = benchmark.report(episodes, str(tmp_path), seeds=seeds, max_turns=8, log=lambda *a: None)
    assert s["per_seed_scores"] == {"0": 70.0, "1": 40.0, "2": 50.0}
    assert s["seed_mean"] == pytest.approx(160 / 3) and s["score"] == pytest.approx(160 / 3)
    assert s["seed_std"] == pytest.approx(statistics.stdev([70, 40, 50]))  # sample std, = 15.275...
    assert s["seed_std"] == pytest.approx(15.2753, abs=1e-4)
    assert json.load(open(tmp_path / "summary.json"))["per_seed_scores"]["1"] == 40.0


def test_svg_has_one_line_per_dialogue_and_a_mean_ending_at_the_score(tmp_path):
    trajectories = [[50, 70, 100], [50, 20, 0], [50, 55, 60, 62]]
    svg = benchmark.write_svg(str(tmp_path / "t.svg"), trajectories, max_turns=8, title="score 54.0",
                              labels=["a", "b", "c"])
    root = ET.parse(tmp_path / "t.svg").getroot()
    assert svg.startswith("<svg") and root.tag == f"{SVG}svg"
    lines = root.findall(f"{SVG}polyline[@class='dialogue']")
    assert len(lines) == 3
    assert [line.get("stroke") for line in lines] == [benchmark.OUTCOME_COLORS[k] for k in
                                                      ("success", "failure", "max_turns")]
    assert [len(line.get("points").split()) for line in lines] == [3, 3, 4]
    (mean,) = root.findall(f"{SVG}polyline[@class='mean']")
    # ended dialogues keep their final value, so the mean's last point is the score: (100 + 0 + 62) / 3
    last_y = float(mean.get("points").split()[-1].split(",")[1])
    top, bottom = 62, 460 - 56  # write_svg's plot area
    assert (bottom - last_y) * 100 / (bottom - top) == pytest.approx(54.0, abs=0.1)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "score 54.0" in texts and "turn" in texts and any("success" in (t or "") for t in texts)


CURVE_ROWS = [  # three metrics.jsonl rows; kl_ref is null, entropy absent: neither gets a panel
    {"step": 0, "reward": 0.2, "success": 0.0, "failure": 0.5, "policy_tokens": 100, "kl_ref": None},
    {"step": 5, "reward": 0.5, "success": 0.25, "failure": 0.25, "policy_tokens": 150, "eval_score": 40.0},
    {"step": 10, "reward": 0.8, "success": 1.0, "failure": 0.0, "policy_tokens": 200, "kl_ref": float("nan")},
]


def panels(root):
    return {g.get("data-series"): g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"}


def series_points(panel):
    (line,) = [p for p in panel.iter(f"{SVG}polyline") if p.get("class") == "series"]
    return [tuple(map(float, xy.split(","))) for xy in line.get("points").split()]


def test_curves_panels_and_hand_worked_coordinates(tmp_path):
    svg = benchmark.write_curves(str(tmp_path / "curves.svg"), CURVE_ROWS, "run 7")
    root = ET.parse(tmp_path / "curves.svg").getroot()   # well-formed XML
    assert svg.startswith("<svg") and root.tag == f"{SVG}svg" and "run 7" in [t.text for t in root.iter(f"{SVG}text")]
    found = panels(root)
    assert list(found) == ["reward", "success", "failure", "eval_score", "policy_tokens"]
    # Layout (benchmark.py): 2 columns of 450 x 240 panels from (30, 70); plot area x+60..x+420, y+30..y+190.
    # Steps 0..10 span 360 px: x = 90 + 36 * step (left column), 540 + 36 * step (right column).
    # reward, success, failure: y range 0..1 over 160 px; eval score 0..100; policy tokens: its data, 100..200.
    assert series_points(found["reward"]) == [(90, 260 - 32), (270, 260 - 80), (450, 260 - 128)]      # .2 .5 .8
    assert series_points(found["success"]) == [(540, 260), (720, 260 - 40), (900, 100)]              # 0 .25 1
    assert series_points(found["failure"]) == [(90, 500 - 80), (270, 500 - 40), (450, 500)]          # 2nd row
    assert series_points(found["eval_score"]) == [(720, 500 - 64)]                                    # 40 of 100
    assert series_points(found["policy_tokens"]) == [(90, 740), (270, 660), (450, 580)]              # 3rd row
    titles = [t.text for g in found.values() for t in g.iter(f"{SVG}text") if t.get("font-weight") == "bold"]
    assert titles[0] == "mean reward: last 0.8 at step 10" and "last 40 at step 5" in titles[3]


def test_curves_points_read_back_through_the_axis_labels(tmp_path):
    """Independent of the layout: invert each panel's own tick labels (pixel -> value) and recover the data."""
    rows = [{"step": s, "reward": r, "entropy": e, "kl_ref": k}
            for s, r, e, k in [(3, 0.41, 2.7, -0.002), (17, 0.48, 2.1, 0.013), (40, 0.66, 1.35, 0.031)]]
    root = ET.fromstring(benchmark.write_curves(None, rows))
    found = panels(root)
    assert list(found) == ["reward", "kl_ref", "entropy"]
    for key, panel in found.items():
        ticks = [t for t in panel.iter(f"{SVG}text") if t.text and t.text != "step" and t.get("font-weight") is None]
        xt = [(float(t.get("x")), float(t.text)) for t in ticks if t.get("text-anchor") == "middle"]
        # a y label sits 4 px below its grid line
        yt = [(float(t.get("y")) - 4, float(t.text)) for t in ticks if t.get("text-anchor") == "end"]
        assert len(xt) >= 2 and len(yt) >= 2
        to_value = lambda p, t: t[0][1] + (p - t[0][0]) * (t[-1][1] - t[0][1]) / (t[-1][0] - t[0][0])  # noqa: E731
        read = [(to_value(x, xt), to_value(y, yt)) for x, y in series_points(panel)]
        span = max(r[key] for r in rows) - min(r[key] for r in rows)
        for (step, value), row in zip(read, rows):
            assert step == pytest.approx(row["step"], abs=0.1) and value == pytest.approx(row[key], abs=span / 100)


def test_curves_single_step_and_no_rows(tmp_path):
    root = ET.fromstring(benchmark.write_curves(None, [{"step": 4, "reward": 0.5, "policy_tokens": 7}]))
    found = panels(root)
    assert list(found) == ["reward", "policy_tokens"]
    (x, y), = series_points(found["reward"])
    assert (x, y) == (270, 180)   # a lone step sits mid-panel; 0.5 of 0..1 is mid-height
    assert len(list(found["reward"].iter(f"{SVG}circle"))) == 1   # and is drawn as a dot
    assert series_points(found["policy_tokens"]) == [(720, 180)]   # a constant series sits mid-height too
    empty = ET.fromstring(benchmark.write_curves(None, [], "nothing yet"))
    assert panels(empty) == {} and "no metrics rows with a step yet" in [t.text for t in empty.iter(f"{SVG}text")]


def test_nice_ticks():
    assert benchmark.nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert benchmark.nice_ticks(0, 29, integer=True) == [0, 5, 10, 15, 20, 25]
    assert benchmark.nice_ticks(0, 2, integer=True) == [0, 1, 2]     # never half steps
    assert benchmark.nice_ticks(103, 187) == [120, 140, 160, 180]
    assert benchmark.nice_ticks(4, 4) == [4]


# ---------------------------------------------------------------------------------------------------------
# eval end to end against a fake OpenAI-compatible policy endpoint (a real HTTP server on 127.0.0.1)

KIND = ("I hear you, and that sounds really hard. It makes sense that you feel this way, and I'm here for you. "
        "What has been weighing on you most? Tell me, I'm listening.")
RUDE = ("Just relax, it's fine. Whatever happened, at least it could be worse, so cheer up and move on. "
        "You should simply get over it.")
MEH = "I see what you mean."
PROFILES = [  # our JSONL layout; the fake policy picks its canned reply by the opening message
    {"id": "kind", "persona": "Ana, 30, a nurse.", "scenario": "Her dog died.", "initial_emotion": 60,
     "hidden_intention": "You want to vent and be listened to.", "opening": "My dog died last week."},
    {"id": "rude", "persona": "Ben, 40, a driver.", "scenario": "He failed his test.", "initial_emotion": 40,
     "hidden_intention": "You want deep empathy, not shallow comfort.", "opening": "I failed my driving test."},
    {"id": "meh", "persona": "Cy, 22, a student.", "scenario": "A flatmate eats his food.", "initial_emotion": 30,
     "hidden_intention": "You want practical next steps.", "opening": "My flatmate eats my food."},
]


class FakePolicy(http.server.BaseHTTPRequestHandler):
    requests, headers_seen = [], []  # every chat request and Authorization header received

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /v1/models, used by the client's reachability check
        self._send({"data": [{"id": "fake-empath"}]})

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakePolicy.requests.append(payload)
        FakePolicy.headers_seen.append(self.headers.get("Authorization"))
        opening = payload["messages"][1]["content"]
        reply = KIND if "dog" in opening else RUDE if "driving" in opening else MEH
        self._send({"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakePolicy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakePolicy.requests, FakePolicy.headers_seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def write_profiles(path):
    path.write_text("".join(json.dumps(p) + "\n" for p in PROFILES))
    return str(path)


def read_outputs(out):
    transcripts = [json.loads(line) for line in open(out / "transcripts.jsonl")]
    return transcripts, json.load(open(out / "summary.json")), ET.parse(out / "trajectories.svg").getroot()


def test_eval_against_fake_endpoint(tmp_path, fake_endpoint, capsys, monkeypatch):
    out = tmp_path / "eval"
    monkeypatch.setenv("FAKE_POLICY_KEY", "sk-do-not-log-qzxj")
    benchmark.main(["eval", "--policy", fake_endpoint, "--policy-model", "fake-empath", "--seeds", "0,1",
                    "--protocol", "classic",  # ours: success at 100, failure at 0, 8 turns
                    "--policy-key-env", "FAKE_POLICY_KEY", "--profiles", write_profiles(tmp_path / "p.jsonl"),
                    "--out", str(out)])
    transcripts, summary, svg = read_outputs(out)
    assert len(transcripts) == 6  # 3 profiles x 2 seeds
    by_id = {t["profile_id"]: t for t in transcripts if t["seed"] == 1}
    assert by_id["kind"]["end_reason"] == "success" and by_id["kind"]["final_emotion"] == 100
    assert by_id["rude"]["end_reason"] == "failure" and by_id["rude"]["final_emotion"] == 0
    assert by_id["meh"]["end_reason"] == "max_turns" and len(by_id["meh"]["turns"]) == 8
    turn = by_id["rude"]["turns"][0]
    assert set(turn) == {"turn", "agent", "emotion", "change", "thought", "user"} and turn["agent"] == RUDE
    assert turn["change"] < 0 and turn["emotion"] == 40 + turn["change"] and turn["thought"] and turn["user"]
    # the score is the mean final emotion, recomputed here from the transcripts
    finals = [t["final_emotion"] for t in transcripts]
    assert summary["score"] == pytest.approx(sum(finals) / 6)
    assert summary["success_rate"] == pytest.approx(1 / 3) and summary["failure_rate"] == pytest.approx(1 / 3)
    assert set(summary) >= {"score", "success_rate", "failure_rate", "mean_turns", "per_seed_scores", "seed_mean",
                            "seed_std", "config"}
    assert summary["seed_std"] == 0.0 and summary["config"]["policy_model"] == "fake-empath"
    assert len(svg.findall(f"{SVG}polyline[@class='dialogue']")) == 6
    # what the policy saw: our system prompt, then the dialogue from the agent's side, growing per turn
    system = open(os.path.join(ROOT, "prompts", "policy_system.txt")).read().strip()
    first = [r for r in FakePolicy.requests if len(r["messages"]) == 2]
    assert first and all(r["messages"][0] == {"role": "system", "content": system} for r in first)
    later = max(FakePolicy.requests, key=lambda r: len(r["messages"]))["messages"]
    assert [m["role"] for m in later[1:]] == ["user", "assistant"] * 7 + ["user"]  # the 8th turn of "meh"
    assert later[2]["content"] == MEH and later[3]["content"] == by_id["meh"]["turns"][0]["user"]
    printed = capsys.readouterr().out
    assert "turn 1/8" in printed and "score" in printed and "rude" in printed  # progress and the table
    # the key went to the server, and nowhere else
    assert FakePolicy.headers_seen and all(h == "Bearer sk-do-not-log-qzxj" for h in FakePolicy.headers_seen)
    written = "".join(open(out / name).read() for name in os.listdir(out))
    assert "qzxj" not in printed + written and summary["config"]["policy_key_env"] == "FAKE_POLICY_KEY"


def test_eval_local_tiny_model_sees_what_training_sees(tmp_path, tiny_qwen2):
    import rollout
    from model import load_model, load_tokenizer

    out = tmp_path / "eval"
    benchmark.main(["eval", "--policy", tiny_qwen2, "--limit", "3", "--max-turns", "2", "--max-new-tokens", "12",
                    "--out", str(out)])
    transcripts, summary, svg = read_outputs(out)
    assert len(transcripts) == 3 and len(svg.findall(f"{SVG}polyline[@class='dialogue']")) == 3
    assert all(1 <= len(t["turns"]) <= 2 for t in transcripts)
    # eval is rollout.rollout with greedy decoding: the same replies come out of the training loop
    model, tokenizer = load_model(tiny_qwen2), load_tokenizer(tiny_qwen2)
    dialogues = rollout.rollout(model, tokenizer, sim.builtin_profiles("test")[:3], sim.RulesBackend(), think=False,
                                max_turns=2, max_new_tokens=12, temperature=0.0, seeds=[0, 1, 2])
    assert [[t["agent"] for t in d.episode.turns] for d in dialogues] == [[t["agent"] for t in tr["turns"]]
                                                                          for tr in transcripts]
    assert summary["score"] == pytest.approx(statistics.mean(d.episode.emotion for d in dialogues))


# ---------------------------------------------------------------------------------------------------------
# CLI: speed table, one-line errors


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def printed(text, scale=1.0):
    """The interval a number printed with len(decimals) decimals stands for: (low, high), times scale."""
    half = 0.5 * 10 ** -len(text.partition(".")[2])
    return (float(text) - half) * scale, (float(text) + half) * scale


def test_speed_prints_a_table_with_ratios():
    started = time.monotonic()
    r = run_cli("speed", "--hidden", "32", "--layers", "1", "--batch", "2", "--prompt-len", "8", "--new-tokens", "6",
                "--repeats", "3")  # (no --compile: the compiled path is checked in test_model.py)
    wall = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("generation"))
    assert "tokens/s" in header and "vs transformers" in header and "same tokens" in header
    rows = {name: next(line for line in lines if line.startswith(name)).split() for name in
            ("model.py generate", "transformers generate")}
    assert not any(line.startswith("model.py + compile") for line in lines)
    hf = printed(rows["transformers generate"][-4])
    for name, row in rows.items():
        # transformers is model.py's independent reference: the same greedy tokens
        assert row[-1] == "100.0%", name
        # every derived column recomputed from the printed median seconds, within their rounding: tokens/s =
        # 2 x 6 / seconds (the median of 3 runs), vs transformers = transformers' seconds / seconds
        s = printed(row[-4])
        low, median, high = (float(v) for v in row[-3].split("/"))
        assert low <= median <= high and 12 / s[1] - 0.05 <= median <= 12 / s[0] + 0.05, (name, row)
        assert hf[0] / s[1] - 0.005 <= float(row[-2].rstrip("x")) <= hf[1] / s[0] + 0.005, (name, row)
        wall -= 3 * 12 / (high + 0.05)  # the 3 timed runs (each at least 12 / the highest tokens/s seconds)
    assert wall > 0  # ran inside this subprocess: the times are real seconds, against the test's own clock
    step = next(line for line in lines if line.startswith("training step"))
    low, median, high = (float(v) for v in re.search(r"tokens: (\S+) s", step).group(1).split("/"))
    assert 0 < low <= median <= high


def test_rollout_prints_the_engine_against_its_ablations():
    r = run_cli("rollout", "--hidden", "64", "--layers", "2", "--profiles", "1", "--group-size", "3",
                "--max-turns", "3", "--max-new-tokens", "8", "--latencies-ms", "0,30", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().endswith(("yes", "NO"))]
    assert [(row[0], row[1]) for row in rows] == [(f"{ms}ms", v) for ms in (0, 30)
                                                  for v in ("engine", "no-overlap", "no-kv-reuse", "lockstep")]
    for row in rows:  # (the variants share the engine; its independent reference: test_rollout.check_engine_logits)
        assert row[-1] == "yes"  # every variant plays the very same dialogues
    ratio = {(row[0], row[1]): float(row[-6]) for row in rows}  # the prefill/conv column
    # KV reuse prefills each token at most once (the sampled ones are fed by decode steps); re-prefilling
    # the whole conversation every turn feeds more tokens than the conversation has
    assert ratio[("0ms", "engine")] < 1 < ratio[("0ms", "no-kv-reuse")]


def test_import_loads_no_speed_machinery():
    """rlver.py imports benchmark for its periodic eval, the --out lock and the curves: that import must not
    load transformers or http.server, which only the speed and rollout benchmarks use."""
    code = "import sys, benchmark; print(sorted({'transformers', 'http.server'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("case", ["missing folder", "folder without config", "unreachable endpoint",
                                  "malformed profiles", "seeds not integers", "out is a file",
                                  "truncated safetensors", "rate out of range", "latencies not numbers"])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, case, tiny_qwen2):
    import shutil

    bad_profiles = tmp_path / "bad.jsonl"
    bad_profiles.write_text('{"id": "x", "persona": "no scenario"}\n')
    out = tmp_path / "out"
    if case == "out is a file":
        out.write_text("earlier notes\n")
    if case == "truncated safetensors":
        shutil.copytree(tiny_qwen2, tmp_path / "truncated")
        weights = tmp_path / "truncated" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    args, expected = {
        "missing folder": (["--policy", str(tmp_path / "nope")], "neither a local model folder"),
        "folder without config": (["--policy", str(tmp_path)], "config.json not found"),
        "unreachable endpoint": (["--policy", f"http://127.0.0.1:{closed_port()}/v1", "--policy-model", "m"],
                                 "cannot reach policy endpoint"),
        "malformed profiles": (["--policy", str(tmp_path), "--profiles", str(bad_profiles)], "missing key"),
        "seeds not integers": (["--policy", tiny_qwen2, "--seeds", "a,b"], "--seeds 'a,b'"),
        "out is a file": (["--policy", tiny_qwen2], "is a file, not a folder"),
        "truncated safetensors": (["--policy", str(tmp_path / "truncated")], "truncated"),
        "rate out of range": (["--policy", tiny_qwen2, "--max-parse-failure-rate", "nan"],
                              "--max-parse-failure-rate nan: give a finite number"),
        "latencies not numbers": (["--latencies-ms", "0,fast"], "--latencies-ms '0,fast': give comma-separated"),
    }[case]
    command = ["rollout"] if case == "latencies not numbers" else ["eval", "--out", str(out)]
    r = run_cli(*command, *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert expected in r.stderr
    if case == "out is a file":
        assert out.read_text() == "earlier notes\n"  # untouched
    else:
        assert not out.exists()  # failed before any work


def test_eval_refuses_to_score_a_simulator_that_ignores_the_format(tmp_path, tiny_qwen2, garbage_simulator_server):
    out = tmp_path / "eval"
    r = run_cli("eval", "--policy", tiny_qwen2, "--limit", "2", "--max-turns", "2", "--max-new-tokens", "8",
                "--simulator", garbage_simulator_server.url, "--simulator-model", "sim-model",
                "--simulator-key-env", "RLVER_TEST_KEY", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "4/4 simulator turns were unparseable" in r.stderr and "no score" in r.stderr
    assert "I refuse to use your format" in r.stdout  # one offending answer shown
    assert garbage_simulator_server.key not in r.stdout + r.stderr
    assert not (out / "summary.json").exists()
