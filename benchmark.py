"""
benchmark.py: how good is a policy at empathetic dialogue, and how fast is our model code?

    python benchmark.py eval  --policy runs/rlver/checkpoint --simulator rules --seeds 0,1,2
    python benchmark.py eval  --policy http://localhost:8000/v1 --policy-model gpt-4o --simulator rules
    python benchmark.py leaderboard runs/eval/transcripts.jsonl gpt-4.1_result.jsonl --versus gpt-4.1
    python benchmark.py replay SAGE/dataset/*/*_result.jsonl --official-prompts digitalhuman   # no LLM
    python benchmark.py speed --batch 8 --new-tokens 128 --device cuda --dtype bfloat16
    python benchmark.py speed --shape qwen2.5-7b --device cuda --dtype bfloat16   # real size, random weights
    python benchmark.py rollout --latencies-ms 0,50,200

`eval`: a SAGE-style benchmark (Sentient Agent as a Judge, arXiv 2505.02847; RLVER reports its "Sentient
benchmark" score). How the score is computed, in four steps (the rules are --protocol's, simulator.PROTOCOLS and
the README's table: sage, the default, is SAGE's test loop; rlver RLVER's trainer; classic ours):
  1. Every test profile becomes a simulated user (simulator.py) with a persona, a scenario, a hidden intention,
     an opening message and an emotion on a 0..100 scale (its initial_emotion, else the protocol's start:
     sage 40, rlver 30, classic 50).
  2. The policy under test and that user talk for at most --max-turns scored replies (sage and rlver 9,
     classic 8). After each policy reply the simulator reasons about how the reply lands and writes an integer
     change; the CODE clamps it as the protocol says (sage +-10, classic +-30, rlver not) and applies it:
         emotion <- clamp(emotion + change, 0, 100)
  3. A dialogue ends as the protocol says (simulator.dialogue_end): sage on a goodbye word, at 100 (success)
     or below 10 (failure); rlver on a goodbye word or at 0; classic at 0 or 100; otherwise after max turns
     (or, in any protocol, when a --think reply was cut before </think>: there is no reply to show).
  4. score = mean over dialogues of the FINAL emotion (0..100); success = final emotion 100; failure = below
     the protocol's failure line (sage 10, else 1); mean turns = average dialogue length. `leaderboard`
     compares systems, ours and SAGE's published result files, when their provenance makes them comparable.
With several seeds every profile is played once per seed; the score is the mean over all dialogues and the
spread is the std of the per-seed scores. The policy is a local HF folder, a model object already in memory
(rlver.py's periodic evaluation) or any OpenAI-compatible endpoint, so GPT-4o-class models are scored the same.

`replay`: SAGE's published result files played back through evaluate() with the official prompts and no LLM (the
published agent replies as the policy, the published simulator outputs as the simulator): the loop's rules and parser
must give the published emotion after every turn, and the published Score / Success / Failure.

`speed`: decode tokens/s of model.generate (static KV cache) against transformers' generate and against a
no-cache loop, on the same weights and prompts, plus the time split of one training step, each next to its
roofline (the least time the device's memory bandwidth and matmul peak allow: measured on a CPU, datasheet on a
GPU). --shape NAME measures a real architecture (model.SHAPES) with random weights, without any download.

`rollout`: rollout.rollout (one KV-cache slot per dialogue, continuous batching, the simulator overlapped)
against its ablations (--no-kv-reuse, --no-overlap, both = the old lockstep re-prefill loop), on the same model
and profiles, with a simulated user on 127.0.0.1 that answers after a set latency.

Read top to bottom: score arithmetic -> report files (transcripts, summary, SVG) -> training curves
(curves.svg from metrics.jsonl) -> evaluate() -> leaderboard -> replay -> speed harness -> command line.
"""

import argparse
import decimal
import fcntl
import hashlib
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from xml.sax.saxutils import escape

import torch

import rollout as ro
import simulator as sim
from model import (SHAPES, CheckpointError, check_weights, generate, load_model, load_tokenizer, make_tiny_checkpoint,
                   random_model, read_config, token_logprobs)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype choices of both commands


class BenchmarkError(ValueError):
    """A problem the user can fix (bad flag, bad path, unreachable endpoint): printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# 1. Score arithmetic (pure functions of the episodes' emotions)


def trajectory(episode):
    """Emotion before the first reply and after every turn: [e_0, e_1, ..., e_final]."""
    return [episode.profile.initial_emotion] + [turn["emotion"] for turn in episode.turns]


def summarize(episodes):
    """The SAGE-style numbers over a list of finished simulator.Episodes (one per dialogue)."""
    if not episodes:
        raise ValueError("no dialogues to summarize")
    n = len(episodes)
    finals = [ep.emotion for ep in episodes]
    outcomes = [sim.final_outcome(ep.emotion, ep.profile.protocol) for ep in episodes]
    return {
        "score": sum(finals) / n,  # mean final emotion, 0..100: the headline number
        "success": outcomes.count("success"),  # final emotion 100 (SAGE's Success count)
        "failure": outcomes.count("failure"),  # below the protocol's failure line (SAGE: < 10)
        "success_rate": outcomes.count("success") / n,
        "failure_rate": outcomes.count("failure") / n,
        "mean_turns": sum(len(ep.turns) for ep in episodes) / n,
        "dialogues": n,
        **{k: sum(getattr(ep, k) for ep in episodes) for k in sim.COUNTS},  # cut replies, cut thoughts, ...
    }


def seed_spread(per_seed_scores):
    """Mean and sample std (n-1) of the per-seed scores; std is 0.0 for a single seed."""
    scores = list(per_seed_scores.values())
    return statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------
# 2. Report: a per-profile table, transcripts.jsonl, summary.json and an SVG of the emotion trajectories

OUTCOME_COLORS = {"success": "#1a9850", "failure": "#d73027", "max_turns": "#7b8794"}


def outcome_labels(protocol):
    """Legend words of the three outcome colours under a protocol (its failure line: 0 classic/rlver, 10 sage)."""
    below = sim.protocol_of(protocol).failure_below
    return {"success": "success (reached 100)",
            "failure": "failure (reached 0)" if below <= 1 else f"failure (ended below {below})",
            "max_turns": "ended otherwise"}


def profile_table(episodes):
    """One row per profile over its seeds (in play order): final emotions, their mean, mean turns, outcomes."""
    rows = {}
    for ep in episodes:
        rows.setdefault(ep.profile.id, []).append(ep)
    width = max(12, *(len(pid) for pid in rows))
    lines = [f"{'profile':<{width}}  {'final emotion per seed':<24} {'mean':>6} {'turns':>6}  outcomes"]
    for pid, eps in rows.items():
        finals = " ".join(str(ep.emotion) for ep in eps)
        marks = "".join({"success": "S", "failure": "F", "goodbye": "G"}.get(ep.end_reason, ".") for ep in eps)
        lines.append(f"{pid:<{width}}  {finals:<24} {statistics.mean(ep.emotion for ep in eps):>6.1f} "
                     f"{statistics.mean(len(ep.turns) for ep in eps):>6.1f}  {marks}")
    lines.append("(outcomes per seed: S success (100), F failure (0; under sage below 10), G said goodbye, "
                 ". ended at max turns)")
    return "\n".join(lines)


# Hand-written SVG, no plotting library. Both pictures (trajectories.svg here, curves.svg for training) are
# built from the same three pieces: _svg_start (canvas, title, subtitle), draw_axes (grid, ticks, frame and
# labels of one plot area; it returns the data -> pixel maps) and _svg_end (close and write).


def _num(value):
    """A tick or value label: whole numbers in full (20, 12345), others to 4 significant digits (0.25, 1.5e-05)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def _scale(lo, hi, a, b):
    """The linear map sending data lo -> pixel a and hi -> pixel b; a zero-width range maps to the middle."""
    if hi == lo:
        return lambda v: (a + b) / 2
    return lambda v: a + (v - lo) * (b - a) / (hi - lo)


def nice_ticks(lo, hi, most=6, integer=False):
    """Round tick values inside [lo, hi]: the finest step of 1, 2 or 5 x 10^k that gives at most `most`
    ticks (integer=True: steps of at least 1, for training steps). A zero-width range gets the one tick lo."""
    if hi <= lo:
        return [lo]
    magnitude = 10 ** math.floor(math.log10((hi - lo) / most))
    for step in (m * magnitude for m in (1, 2, 5, 10, 20)):   # 20 x magnitude always fits
        step = max(step, 1) if integer else step
        first = math.ceil(lo / step - 1e-9) * step
        count = int((hi - first) / step + 1e-9) + 1
        if count <= most:
            return [first + k * step for k in range(count)]


def _svg_start(width, height, title, subtitle, x=64):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{x}" y="26" font-size="17" font-weight="bold">{escape(title)}</text>',
            f'<text x="{x}" y="45" fill="#555">{escape(subtitle)}</text>']


def _svg_end(out, path):
    """Close the document, write it if path is set, return the text."""
    svg = "\n".join(out + ["</svg>"]) + "\n"
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(svg)
    return svg


def draw_axes(out, box, xlim, ylim, xticks, yticks, xlabel, ylabel=None):
    """
    Append one plot area's axes to `out`: a light horizontal grid line and a label per y tick, a tick mark
    and a label per x tick, the L-shaped frame, the x label under it and (optionally) a rotated y label.
    box = (left, top, right, bottom) in pixels; xlim/ylim = the data (lo, hi) mapped onto it (y grows up).
    Returns (x, y): the data -> pixel maps, for whatever is drawn inside.
    """
    left, top, right, bottom = box
    x, y = _scale(*xlim, left, right), _scale(*ylim, bottom, top)
    for v in yticks:
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{right}" y2="{y(v):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{_num(v)}</text>')
    for v in xticks:
        out.append(f'<line x1="{x(v):.1f}" y1="{bottom}" x2="{x(v):.1f}" y2="{bottom + 5}" stroke="#333"/>')
        out.append(f'<text x="{x(v):.1f}" y="{bottom + 19}" text-anchor="middle">{_num(v)}</text>')
    out.append(f'<polyline points="{left},{top} {left},{bottom} {right},{bottom}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 36}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        middle = (top + bottom) / 2
        out.append(f'<text x="{left - 46}" y="{middle}" text-anchor="middle" '
                   f'transform="rotate(-90 {left - 46} {middle})">{escape(ylabel)}</text>')
    return x, y


def write_svg(path, trajectories, *, max_turns, title, subtitle="", labels=None, protocol="classic"):
    """
    Emotion (y, 0..100) against turn (x, 0..max_turns): one thin polyline per dialogue coloured by how it
    ended, and the mean trajectory in bold. In the mean, a dialogue that ended early keeps its final emotion
    (it stays at 100 or 0), so the mean line ends exactly at the score.
    trajectories: list of [e_0, e_1, ...] emotion lists. Returns the SVG text (and writes it if path is set).
    """
    W, H = 900, 460
    left, right, top, bottom = 64, W - 270, 62, H - 56  # plot area; the legend lives right of it
    out = _svg_start(W, H, title, subtitle, x=left)
    x, y = draw_axes(out, (left, top, right, bottom), (0, max_turns), (0, 100), range(max_turns + 1),
                     range(0, 101, 20), "turn", "emotion (0 = leaves, 100 = fully supported)")
    for i, traj in enumerate(trajectories):
        jitter = (i % 5 - 2) * 0.8  # < 1 px apart so identical dialogues do not hide behind each other
        points = " ".join(f"{x(t):.1f},{y(e) + jitter:.1f}" for t, e in enumerate(traj))
        label = labels[i] if labels else f"dialogue {i}"
        out.append(f'<polyline class="dialogue" points="{points}" fill="none" stroke-width="1.5" '
                   f'stroke="{OUTCOME_COLORS[sim.final_outcome(traj[-1], protocol) or "max_turns"]}" stroke-opacity="0.55">'
                   f'<title>{escape(f"{label}: final emotion {traj[-1]}")}</title></polyline>')
    if trajectories:
        longest = max(len(traj) for traj in trajectories)
        mean = [statistics.mean(traj[min(t, len(traj) - 1)] for traj in trajectories) for t in range(longest)]
        points = " ".join(f"{x(t):.1f},{y(e):.1f}" for t, e in enumerate(mean))
        out.append(f'<polyline class="mean" points="{points}" fill="none" stroke="#111" stroke-width="3.5"/>')
        out.append(f'<text x="{x(longest - 1) + 6}" y="{y(mean[-1]) - 6}" font-weight="bold">{mean[-1]:.1f}</text>')
    counts = {k: sum((sim.final_outcome(traj[-1], protocol) or "max_turns") == k for traj in trajectories)
              for k in OUTCOME_COLORS}
    labels = outcome_labels(protocol)
    legend = [(OUTCOME_COLORS[k], 1.5, f"{labels[k]}: {counts[k]}") for k in OUTCOME_COLORS]
    legend.append(("#111", 3.5, "mean (ended = final value)"))
    for j, (color, width, text) in enumerate(legend):
        ly = top + 14 + 22 * j
        out.append(f'<line x1="{right + 56}" y1="{ly}" x2="{right + 80}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="{width}"/>')
        out.append(f'<text x="{right + 86}" y="{ly + 4}">{escape(text)}</text>')
    return _svg_end(out, path)


def report(episodes, out_dir=None, *, seeds=None, title="", config=None, max_turns=None, log=print):
    """
    Summarise finished episodes, print the per-profile table, and (if out_dir) write transcripts.jsonl,
    summary.json and trajectories.svg. seeds[i] is the seed episodes[i] was played with (default: all 0).
    Used by evaluate() below and by rlver.py's periodic evaluation. Returns the summary dict.
    """
    seeds = list(seeds) if seeds is not None else [0] * len(episodes)
    summary = summarize(episodes)
    per_seed = {s: summarize([ep for ep, es in zip(episodes, seeds) if es == s])["score"] for s in dict.fromkeys(seeds)}
    summary["per_seed_scores"] = {str(s): score for s, score in per_seed.items()}
    summary["seed_mean"], summary["seed_std"] = seed_spread(per_seed)
    summary["parse_failures"] = sum(ep.parse_failures for ep in episodes)
    summary["config"] = config or {}
    summary["provenance"] = summary["config"].get("provenance")
    log(profile_table(episodes))
    headline = (f"score {summary['score']:.1f} (seeds: {summary['seed_mean']:.1f} ± {summary['seed_std']:.1f}) | "
                f"success {summary['success']} ({summary['success_rate']:.0%}) | "
                f"failure {summary['failure']} ({summary['failure_rate']:.0%}) | "
                f"mean turns {summary['mean_turns']:.2f} | {len(episodes)} dialogues")
    log(f"{title + ': ' if title else ''}{headline}")
    for line in sim.count_warnings(summary, title or "evaluation"):   # cut replies, cut thoughts, wild changes
        log(line)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "transcripts.jsonl"), "w", encoding="utf-8") as f:
            for ep, seed in zip(episodes, seeds):
                record = sim.transcript(ep, seed=seed, provenance=summary["config"].get("provenance"))
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        max_turns = max_turns or summary["config"].get("max_turns") or max(len(ep.turns) for ep in episodes) or 1
        write_svg(os.path.join(out_dir, "trajectories.svg"), [trajectory(ep) for ep in episodes], max_turns=max_turns,
                  title=f"{title + ' - ' if title else ''}Sentient-style score {summary['score']:.1f}",
                  subtitle=headline, labels=[f"{ep.profile.id} (seed {s})" for ep, s in zip(episodes, seeds)],
                  protocol=episodes[0].profile.protocol)
        log(f"wrote {out_dir}/transcripts.jsonl, summary.json, trajectories.svg")
    return summary


# ----------------------------------------------------------------------------------------------------------
# 2b. Training curves: curves.svg from the rows of a run's metrics.jsonl, one small panel per series


# (metrics key, panel title, the y range always shown or None for the data's own range, colour)
CURVE_SERIES = [("reward", "mean reward", (0, 1), "#2166ac"),
                ("success", "success rate (emotion 100)", (0, 1), "#1a9850"),
                ("failure", "failure rate (emotion 0)", (0, 1), "#d73027"),
                ("eval_score", "eval score (mean final emotion)", (0, 100), "#762a83"),
                ("kl_ref", "KL to the reference policy", None, "#e08214"),
                ("entropy", "policy entropy", None, "#35978f"),
                ("policy_tokens", "policy tokens per step", None, "#7b8794")]
# Layout: panels in CURVE_COLUMNS columns, each PANEL_W x PANEL_H pixels, the first at (CURVE_LEFT, CURVE_TOP);
# inside a panel the plot area spans x + 60 .. x + 420 and y + 30 .. y + 190 (the title sits above it).
CURVE_COLUMNS, PANEL_W, PANEL_H, CURVE_LEFT, CURVE_TOP = 2, 450, 240, 30, 70


def _number(value):
    """A metrics value worth plotting: a finite int/float (None, NaN, text and booleans are skipped)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_points(rows, key):
    """[(step, value)] of the rows that carry both a step and a plottable `key`, in step order."""
    return sorted((row["step"], row[key]) for row in rows if _number(row.get("step")) and _number(row.get(key)))


def _y_range(values, fixed):
    """A panel's y range: the fixed range widened to hold every value; or the data's own range, padded
    when all values are equal so the line sits mid-panel."""
    lo, hi = min(values), max(values)
    if fixed:
        return min(fixed[0], lo), max(fixed[1], hi)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def run_rows(out):
    """A training run's metrics.jsonl rows (rlver.py --out), each with its evaluation's score
    (eval/step_N/summary.json) where there is one: the input of write_curves."""
    rows = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            summary = os.path.join(out, "eval", f"step_{row['step']}", "summary.json")
            if os.path.isfile(summary):
                with open(summary) as g:
                    row["eval_score"] = json.load(g)["score"]
            rows.append(row)
    return rows


def write_curves(path, rows, title="training curves"):
    """
    Small multiples of a training run: one panel per series of CURVE_SERIES that appears in `rows` (the
    dicts of metrics.jsonl: step, reward, success, failure, kl_ref, entropy, policy_tokens, and eval rows
    carrying eval_score), each a polyline of the value against the step; absent series get no panel. All
    panels share the x range (every row's step), so the panels line up; the last value is in the panel's
    title and marked with a dot (so a single step still shows). Returns the SVG text (written if path is set).
    """
    series = [(key, name, fixed, color, curve_points(rows, key)) for key, name, fixed, color in CURVE_SERIES]
    series = [s for s in series if s[-1]]
    steps = [row["step"] for row in rows if _number(row.get("step"))]
    n_rows = max(1, math.ceil(len(series) / CURVE_COLUMNS))
    W, H = CURVE_LEFT * 2 + CURVE_COLUMNS * PANEL_W, CURVE_TOP + n_rows * PANEL_H
    subtitle = (f"{len(steps)} metrics rows, steps {_num(min(steps))}..{_num(max(steps))}" if steps
                else "no metrics rows with a step yet")
    out = _svg_start(W, H, title, subtitle, x=CURVE_LEFT)
    xlim = (min(steps), max(steps)) if steps else (0, 1)
    for i, (key, name, fixed, color, points) in enumerate(series):
        px = CURVE_LEFT + (i % CURVE_COLUMNS) * PANEL_W
        py = CURVE_TOP + (i // CURVE_COLUMNS) * PANEL_H
        box = (px + 60, py + 30, px + 420, py + 190)
        ylim = _y_range([v for _, v in points], fixed)
        out.append(f'<g class="panel" data-series="{key}">')
        out.append(f'<text x="{box[0]}" y="{py + 18}" font-weight="bold">{escape(name)}: last '
                   f'{_num(points[-1][1])} at step {_num(points[-1][0])}</text>')
        x, y = draw_axes(out, box, xlim, ylim, nice_ticks(*xlim, integer=True), nice_ticks(*ylim), "step")
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        out.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<circle cx="{x(points[-1][0]):.1f}" cy="{y(points[-1][1]):.1f}" r="3" fill="{color}"/>')
        out.append("</g>")
    return _svg_end(out, path)


# ----------------------------------------------------------------------------------------------------------
# 3. evaluate(): play every profile once per seed, then report


def evaluate(policy, tokenizer, profiles, backend, *, seeds=(0,), max_turns=None, mode="vanilla", think=False,
             max_new_tokens=2048, max_context=8192, temperature=0.0, out_dir=None, log=print, title="", config=None,
             protocol="sage", lang=None, initial_emotion=None, max_parse_failure_rate=0.0, turn_deadline=600.0,
             policy_turn_deadline=600.0):
    """
    policy: a model.Transformer in memory (with its tokenizer), played by rollout.rollout, the very loop
    training uses; or a chat client `client(requests) -> texts` such as simulator.OpenAIBackend for an
    endpoint, played by rollout.endpoint_rollout. backend: the simulated user (simulator.make_backend).
    Returns report()'s summary dict. Refuses (BenchmarkError, nothing written) when more than
    max_parse_failure_rate of the simulator's turns were unparseable: such a score measures nothing.
    """
    local = isinstance(policy, torch.nn.Module)
    max_turns = max_turns or sim.protocol_of(protocol).max_turns
    # the protocol's start emotion and language; openings written once, shared by every seed (as SAGE's first_talk)
    profiles = sim.prepare_profiles(profiles, backend, protocol=protocol, mode=mode, lang=lang,
                                    initial_emotion=initial_emotion, log=log)
    config = dict(config or {}, seeds=list(seeds), max_turns=max_turns, mode=mode, think=think, protocol=protocol,
                  max_new_tokens=max_new_tokens, temperature=temperature, n_profiles=len(profiles))
    episodes, episode_seeds = [], []
    for seed in seeds:
        start = time.time()
        log(f"seed {seed}: {len(profiles)} dialogues, {'local model' if local else 'endpoint'} policy vs {backend!r}")
        if local:  # each dialogue its own random stream, as in training (greedy at temperature 0)
            dialogues = ro.rollout(policy, tokenizer, profiles, backend, think=think, max_turns=max_turns,
                                   max_new_tokens=max_new_tokens, max_context=max_context, temperature=temperature,
                                   mode=mode, turn_deadline=turn_deadline,
                                   seeds=[ro.rollout_seed(seed, 0, i) for i in range(len(profiles))])
            played = [d.episode for d in dialogues]
        else:  # (an endpoint gets no seed: with temperature 0 the seeds repeat, above 0 they are not reproducible)
            try:
                played = ro.endpoint_rollout(policy, profiles, backend, mode=mode, max_turns=max_turns, think=think,
                                             log=log, turn_deadline=turn_deadline,
                                             policy_turn_deadline=policy_turn_deadline)
            except sim.SimulatorError as e:  # the client, made with role="policy", names the endpoint
                raise BenchmarkError(str(e)) from None
        log(f"seed {seed}: score {summarize(played)['score']:.1f} in {time.time() - start:.1f}s")
        episodes += played
        episode_seeds += [seed] * len(played)
    sim.check_parse_failures(*sim.parse_failure_stats(episodes), max_parse_failure_rate, "evaluation", warn=log)
    return report(episodes, out_dir, seeds=episode_seeds, title=title, config=config, max_turns=max_turns, log=log)


# ----------------------------------------------------------------------------------------------------------
# 3b. Leaderboard: systems side by side on the same scenarios, from our eval output and SAGE's result files
#
# A SAGE result file (SAGE/test_npc.py writes it) is JSONL, one record per scenario: "id", "emo_point" (the
# final emotion) and "history", whose user turns carry "emotion-point". Ours is an eval's transcripts.jsonl
# ("profile_id", "final_emotion", "initial_emotion", "turns"[i]["emotion"], "protocol"). SAGE's numbers:
# Score = mean final emotion shown with round-half-up to 1 decimal, Success = finals >= 100, Failure =
# finals < 10 (our records use their own protocol's failure line).
COLORS = ["#2166ac", "#d73027", "#1a9850", "#762a83", "#e08214", "#35978f", "#7b8794", "#c51b7d"]


def _system_name(path):
    base = os.path.basename(path)
    if base == "transcripts.jsonl":   # an eval output directory: name it after the directory
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = base.rsplit(".", 1)[0] if base.endswith(".jsonl") else base
    return stem[:-len("_result")] if stem.endswith("_result") else stem


def _published_provenance(path):
    """What a SAGE published result file says about how it was scored: SAGE's loop and prompts, and the
    simulator named by its folder (dataset/deepseek-v3-2024-1227_based_simulator/...)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    simulator = folder[:-len("_based_simulator")] if folder.endswith("_based_simulator") else "unknown"
    return {"protocol": "sage", "simulator": simulator, "simulator_prompts": {"source": "official SAGE"}}


def read_system(path):
    """One results file (or an eval output directory) -> {"name", "dialogues": [(id, final, trajectory,
    protocol)], "provenance"} (ours: what eval recorded, "unknown" where an older file has none). Raises
    BenchmarkError for a file in neither layout."""
    if os.path.isdir(path):
        path = os.path.join(path, "transcripts.jsonl")
    if not os.path.isfile(path):
        raise BenchmarkError(f"no such results file {path}")
    dialogues, provenance = [], None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if "emo_point" in r:   # SAGE layout
                    traj = [t["emotion-point"] for t in r["history"] if t.get("role") == "user"]
                    dialogues.append((str(r["id"]), r["emo_point"], traj or [r["emo_point"]], "sage"))
                    provenance = provenance or _published_provenance(path)
                else:                  # our transcripts.jsonl
                    traj = [r["initial_emotion"]] + [t["emotion"] for t in r["turns"]]
                    dialogues.append((str(r["profile_id"]), r["final_emotion"], traj, r.get("protocol", "classic")))
                    provenance = provenance or r.get("provenance") or {
                        "protocol": dialogues[-1][3], "simulator": "unknown", "simulator_prompts": {"source": "unknown"}}
            except (ValueError, KeyError, TypeError) as e:
                raise BenchmarkError(f"{path}:{lineno} is neither a SAGE result record (id, emo_point, "
                                     f"history) nor one of our transcripts ({e!r})") from None
            bad = [v for v in [dialogues[-1][1], *dialogues[-1][2]] if not _number(v)]  # (a string, null, ...)
            if bad:
                raise BenchmarkError(f"{path}:{lineno}: an emotion value is {bad[0]!r}, not a number: fix or drop "
                                     f"that record")
    if not dialogues:
        raise BenchmarkError(f"{path} has no records")
    return {"name": _system_name(path), "dialogues": dialogues, "provenance": provenance}


def round_half_up(value, digits=1):
    """SAGE's printed Score: 61.25 -> 61.3 (Python's round and %.1f give 61.2)."""
    q = decimal.Decimal(1).scaleb(-digits)
    return float(decimal.Decimal(repr(value)).quantize(q, rounding=decimal.ROUND_HALF_UP))


COMPARABLE = ("protocol", "profiles", "simulator_prompts")   # rows that differ in one are not ranked together


def provenance_fields(system):
    """The provenance a leaderboard row shows: protocol, simulator, its prompts' source, the scenarios played
    (count and a digest of their ids, so two files of the same 100 SAGE scenarios agree) and our decoding."""
    p, ids = system["provenance"], sorted({d[0] for d in system["dialogues"]})
    decoding = p.get("decoding") or {}
    return {"protocol": p["protocol"], "simulator": p["simulator"], "simulator_prompts": p["simulator_prompts"]["source"],
            "profiles": f"{len(ids)} ids #{_text_sha256(chr(10).join(ids))[:8]}",
            "decoding": (f"T={decoding['temperature']:g} max_new={decoding['max_new_tokens']}" if decoding else "-")}


def leaderboard_rows(systems):
    """Score / Success / Failure / dialogues and the provenance per system, best score first."""
    rows = []
    for system in systems:
        finals = [(final, protocol) for _, final, _, protocol in system["dialogues"]]
        rows.append({"name": system["name"], "score": round_half_up(sum(f for f, _ in finals) / len(finals)),
                     "success": sum(sim.final_outcome(f, p) == "success" for f, p in finals),
                     "failure": sum(sim.final_outcome(f, p) == "failure" for f, p in finals),
                     "dialogues": len(finals), **provenance_fields(system)})
    return sorted(rows, key=lambda r: -r["score"])


def mixed_fields(rows, allow_mixed):
    """The COMPARABLE fields in which the rows differ. Without allow_mixed any such field refuses the table
    (BenchmarkError naming the first field and each system's value): a ranking across it compares nothing."""
    mixed = [k for k in COMPARABLE if len({r[k] for r in rows}) > 1]
    if mixed and not allow_mixed:
        values = ", ".join(f"{r['name']}: {r[mixed[0]]}" for r in rows)
        raise BenchmarkError(f"the systems differ in {mixed[0]} ({values}): their scores are not comparable; "
                             f"rank them anyway with --allow-mixed")
    return mixed


def versus(systems, name):
    """Per-scenario wins / ties / losses of every other system against `name`, on the scenarios both played
    (a scenario played several times, e.g. several seeds, counts with its mean final emotion)."""
    def per_id(system):
        finals = {}
        for pid, final, _, _ in system["dialogues"]:
            finals.setdefault(pid, []).append(final)
        return {pid: statistics.mean(v) for pid, v in finals.items()}
    by_name = {s["name"]: per_id(s) for s in systems}
    name = next((n for n in by_name if n.lower() == name.lower()), name)   # as a README writes it: GPT-4.1
    if name not in by_name:
        raise BenchmarkError(f"--versus {name!r} is none of the systems {sorted(by_name)}")
    base, rows = by_name[name], []
    for other, finals in by_name.items():
        if other == name:
            continue
        common = sorted(set(base) & set(finals))
        rows.append({"name": other, "versus": name, "scenarios": len(common),
                     "wins": sum(finals[i] > base[i] for i in common), "ties": sum(finals[i] == base[i] for i in common),
                     "losses": sum(finals[i] < base[i] for i in common)})
    return rows


def mean_per_turn(system):
    """Mean emotion per user turn over a system's dialogues; an ended dialogue keeps its final emotion."""
    trajs = [traj for _, _, traj, _ in system["dialogues"]]
    longest = max(len(t) for t in trajs)
    return [statistics.mean(t[min(k, len(t) - 1)] for t in trajs) for k in range(longest)]


def write_leaderboard_svg(path, systems):
    """One line per system: its mean emotion per turn (x: user turn, 0 = the opening's emotion)."""
    means = [mean_per_turn(s) for s in systems]
    longest = max(len(m) for m in means)
    W, H = 900, 460
    left, right, top, bottom = 64, W - 270, 62, H - 56
    settings = sorted({f"{s['provenance']['protocol']} protocol, simulator {s['provenance']['simulator']}" for s in systems})
    out = _svg_start(W, H, f"mean emotion per turn ({'; '.join(settings)})", f"{len(systems)} systems", x=left)
    x, y = draw_axes(out, (left, top, right, bottom), (0, max(1, longest - 1)), (0, 100),
                     range(max(2, longest)), range(0, 101, 20), "user turn", "mean emotion")
    for j, (system, mean) in enumerate(zip(systems, means)):
        color = COLORS[j % len(COLORS)]
        points = " ".join(f"{x(t):.1f},{y(e):.1f}" for t, e in enumerate(mean))
        out.append(f'<polyline class="system" points="{points}" fill="none" stroke="{color}" stroke-width="2.5">'
                   f'<title>{escape(system["name"])}</title></polyline>')
        ly = top + 14 + 22 * j
        out.append(f'<line x1="{right + 56}" y1="{ly}" x2="{right + 80}" y2="{ly}" stroke="{color}" stroke-width="2.5"/>')
        out.append(f'<text x="{right + 86}" y="{ly + 4}">{escape(system["name"])}</text>')
    return _svg_end(out, path)


def leaderboard_command(args):
    systems = [read_system(path) for path in args.files]
    names = [s["name"] for s in systems]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"two files give the same system name ({names}); rename one")
    rows = leaderboard_rows(systems)
    mixed = mixed_fields(rows, args.allow_mixed)
    if mixed:
        print(f"WARNING: --allow-mixed: the systems differ in {', '.join(mixed)} (marked *): the scores are not "
              f"comparable", file=sys.stderr)
    vs = versus(systems, args.versus) if args.versus else []
    if args.plot:
        write_leaderboard_svg(args.plot, systems)
    if args.json:
        print(json.dumps(rows if not vs else {"leaderboard": rows, "versus": vs}, ensure_ascii=False))
        return rows
    width = max(6, *(len(n) for n in names))
    fields = ("protocol", "simulator", "simulator_prompts", "profiles", "decoding")
    print(f"{'system':<{width}}  {'Score':>6} {'Success':>8} {'Failure':>8} {'dialogues':>10}  " + " | ".join(fields))
    for r in rows:
        print(f"{r['name']:<{width}}  {r['score']:>6.1f} {r['success']:>8d} {r['failure']:>8d} {r['dialogues']:>10d}  "
              + " | ".join(r[k] + ("*" if k in mixed else "") for k in fields))
    for r in vs:
        print(f"{r['name']} vs {r['versus']}: {r['wins']} wins, {r['ties']} ties, {r['losses']} losses "
              f"on {r['scenarios']} scenarios")
    return rows


# ----------------------------------------------------------------------------------------------------------
# 3c. Replay: SAGE's published result files played back through the eval loop, with no LLM
#
# A published record (SAGE/test_npc.py's output) holds a whole dialogue: the agent's replies and, for every
# user turn after the opening, the simulator's parsed analysis ("planning": its sections and the change),
# its "thinking" and reply ("content"), and the emotion after the turn ("emotion-point"). replay plays every
# scenario through evaluate(), the loop, prompt filling and parser eval plays with --official-prompts, with
# a policy that sends the published agent replies and a simulator that answers every request with the
# published output written back in SAGE's raw format ("Header:\n" + text per section). The loop's own clamp
# (+-10), cap (100), ending rules (goodbye first, >= 100, < 10, 9 scored replies) and parser must then give
# the published emotion and reply after every turn, hence the published Score / Success / Failure.


def published_turns(record):
    """(the agent's replies, the user turns after the opening) of one SAGE result record."""
    history = record["history"]
    return ([m["content"] for m in history if m["role"] == "assistant"],
            [m for m in history if m["role"] == "user"][1:])


def replay_policy(profiles, records):
    """policy(requests) -> texts: a chat whose opening is profile p's and that holds k agent replies gets the
    published reply k + 1 of p's record; past the published dialogue, an empty reply."""
    replies = {p.opening: published_turns(records[p.id])[0] for p in profiles}

    def policy(requests):   # requests: rollout.policy_messages, [system, opening, assistant, user, ...]
        texts = []
        for messages in requests:
            agents, k = replies[messages[1]["content"]], sum(m["role"] == "assistant" for m in messages)
            texts.append(agents[k] if k < len(agents) else "")
        return texts
    return sim.Scripted(lambda messages: policy([messages])[0])


def replay_simulator(prompts, profiles, records):
    """backend(requests) -> texts: every request (one user message) is its scenario's (the one whose scene it
    holds) k-th call of its kind (analysis: the text starts as the analysis template does; else reply), and
    gets the published user turn k written back as SAGE's simulator wrote it: the analysis sections under
    their headers (prompts.headers, Change last), the reply as Thinking: / Response:. Past the published
    dialogue: change 0 and an empty reply."""
    turns = {p.scenario: published_turns(records[p.id])[1] for p in profiles}
    analysis_start, calls = prompts.analysis.split("{{")[0], {}
    past_the_end = {"planning": {"change": 0}, "thinking": "", "content": ""}

    def backend(requests):
        texts = []
        for (message,) in requests:
            text = message["content"]
            scenes = [s for s in turns if s in text]
            if len(scenes) != 1:
                raise sim.SimulatorError(f"replay: a simulator request holds {len(scenes)} of the scenarios' scenes")
            kind = "analysis" if text.startswith(analysis_start) else "reply"
            k = calls[scenes[0], kind] = calls.get((scenes[0], kind), -1) + 1
            turn = turns[scenes[0]][k] if k < len(turns[scenes[0]]) else past_the_end
            if kind == "analysis":
                planning = {key.lower(): value for key, value in turn["planning"].items()}
                texts.append("".join(f"{h}:\n{planning.get(h.lower(), '')}\n" for h in prompts.headers))
            else:
                texts.append(f"Thinking:\n{turn['thinking']}\nResponse:\n{turn['content']}")
        return texts
    return sim.Scripted(lambda messages: backend([messages])[0])


def replay_differences(records, transcripts):
    """One line per scenario whose replay (our transcript record) differs from its published record: final
    emotion and turns on both sides and the first turn where they part (turn 0: the start emotion), where
    a turn is its emotion after the change and the user's reply."""
    lines = []
    for ours in transcripts:
        record = records[ours["profile_id"]]
        users = published_turns(record)[1]
        published = [(record["history"][0]["emotion-point"], None)] + [(u["emotion-point"], u["content"]) for u in users]
        replayed = [(ours["initial_emotion"], None)] + [(t["emotion"], t["user"]) for t in ours["turns"]]
        if published == replayed and record["emo_point"] == ours["final_emotion"]:
            continue
        part = next((i for i in range(max(len(published), len(replayed)))
                     if published[i:i + 1] != replayed[i:i + 1]), None)
        where = (f"they part at turn {part}: published {published[part:part + 1] or 'nothing'}, replayed "
                 f"{replayed[part:part + 1] or 'nothing'}" if part is not None else
                 f"every turn agrees, but the record's emo_point {record['emo_point']} is not its last emotion-point")
        lines.append(f"  {ours['profile_id']}: published final {record['emo_point']} after {len(users)} turns, "
                     f"replayed {ours['final_emotion']} after {len(ours['turns'])}; {where}"[:400])
    return lines


def published_records(path):
    """The records of a SAGE result file (its lines already read by read_system) by id, each checked for the
    fields replay reads (BenchmarkError)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        try:
            agents, users = published_turns(r)
            ok = ("id" in r and isinstance(r["emo_point"], int) and isinstance(r["history"][0]["emotion-point"], int)
                  and all(isinstance(a, str) for a in agents)
                  and all("change" in u["planning"] and "thinking" in u and isinstance(u["content"], str)
                          and isinstance(u["emotion-point"], int) for u in users))
        except (KeyError, TypeError, IndexError):
            ok = False
        if not ok:
            raise BenchmarkError(f"{path}: record {r.get('id', r.get('profile_id'))!r} is not a SAGE published "
                                 f"record (id, emo_point, history whose user turns after the opening carry planning "
                                 f"with its change, thinking, content and emotion-point)")
    return {str(r["id"]): r for r in records}


def replay_file(path, prompts, profiles, log=print):
    """Replay one published result file (see above); print its published row, ours and every scenario that
    differs. Returns True when every scenario reproduces."""
    system, records = read_system(path), published_records(path)
    played = [replace(p, prompts=prompts) for p in profiles if p.id in records]
    unknown = sorted(set(records) - {p.id for p in played})
    if unknown:
        raise BenchmarkError(f"{path}: scenario {unknown[0]} is not among the checkout's SAGE scenarios "
                             f"({len(unknown)} such): replay plays the scenarios of the checkout it is given")
    with tempfile.TemporaryDirectory() as out:   # eval's own output, read back; of its log only the warnings
        evaluate(replay_policy(played, records), None, played, replay_simulator(prompts, played, records),
                 protocol="sage", out_dir=out, log=lambda line: line.lower().startswith("warning") and log(line))
        with open(os.path.join(out, "transcripts.jsonl"), encoding="utf-8") as f:
            transcripts = [json.loads(line) for line in f]
    ours = dict(system, dialogues=[(t["profile_id"], t["final_emotion"], [], "sage") for t in transcripts])
    differ = replay_differences(records, transcripts)
    log(path)
    for label, row in (("published", leaderboard_rows([system])[0]), ("replayed", leaderboard_rows([ours])[0])):
        log(f"  {label:<9}  Score {row['score']:.1f}  Success {row['success']}  Failure {row['failure']}  "
            f"({row['dialogues']} dialogues)")
    log("\n".join(differ) if differ else "  reproduced: every scenario's emotion and reply after every turn")
    return not differ


def replay_command(args):
    prompts = sim.load_official_prompts(args.official_prompts, "sage", False, simulator="replay")
    profiles = sim.load_profiles(sim.official_profiles_path(args.official_prompts))
    if len({p.opening for p in profiles}) < len(profiles) or len({p.scenario for p in profiles}) < len(profiles):
        raise BenchmarkError("replay tells the scenarios apart by their openings and scenes: two of the checkout's "
                             "scenarios share one")
    if not prompts.analysis.split("{{")[0] or prompts.reply.startswith(prompts.analysis.split("{{")[0]):
        raise BenchmarkError("replay tells the two simulator calls apart by the text their templates start with: "
                             "this checkout's analysis and reply templates start alike")
    reproduced = [replay_file(path, prompts, profiles) for path in args.files]
    print(f"replay: {sum(reproduced)}/{len(reproduced)} files reproduce")
    if not all(reproduced):
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------------
# 4. Speed: the same greedy decode three ways, then one training step split into its phases; every time next to
#    its roofline, the least time the device's memory bandwidth and matmul throughput allow for that work.
#    The model is a checkpoint folder, a fresh tiny one, or (--shape) a real architecture with random weights
#    made in memory on the device, so real sizes are measured without downloading anything.


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_times(fn, device, warmup, repeats):
    """Wall times of fn() over `repeats` runs after `warmup` untimed runs. Returns (times, last output)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, result


@torch.no_grad()
def no_cache_generate(model, prompt_ids, new_tokens):
    """The baseline a KV cache removes: recompute the forward over the whole sequence for every new token."""
    ids = prompt_ids  # (B, P)
    for _ in range(new_tokens):
        last_hidden = model(ids, return_hidden=True)[:, -1]  # (B, C): only the last position is needed
        ids = torch.cat([ids, model.lm_head(last_hidden).argmax(-1, keepdim=True)], dim=1)  # (B, T+1)
    return ids[:, prompt_ids.shape[1]:].tolist()


# Datasheet peaks (dense, no sparsity) of the GPUs we expect: memory bytes/s, and matmul FLOP/s per compute
# dtype (float32 = plain fp32, which is how PyTorch runs fp32 matmuls by default, without TF32). Matched in
# order against torch.cuda.get_device_name(), so the more specific names come first. Others: --peak-* flags.
GPU_PEAKS = [
    ("H200", 4.8e12, {"bfloat16": 989e12, "float32": 67e12}),
    ("H100 PCIe", 2.0e12, {"bfloat16": 756e12, "float32": 51e12}),
    ("H100", 3.35e12, {"bfloat16": 989e12, "float32": 67e12}),  # SXM, "NVIDIA H100 80GB HBM3"
    ("A100 80GB PCIe", 1.935e12, {"bfloat16": 312e12, "float32": 19.5e12}),
    ("A100-SXM4-80GB", 2.039e12, {"bfloat16": 312e12, "float32": 19.5e12}),
    ("A100", 1.555e12, {"bfloat16": 312e12, "float32": 19.5e12}),  # the 40 GB models
]


def gpu_peaks(device_name):
    """The GPU_PEAKS row (name, bytes/s, {dtype: FLOP/s}) for a torch.cuda.get_device_name(), or None."""
    return next((row for row in GPU_PEAKS if row[0] in device_name), None)


def measure_cpu_peaks(dtype, repeats=5):
    """
    This CPU's memory bandwidth and matmul throughput, measured now with the run's thread count: the best of
    `repeats` sums over a 256 MiB tensor (a read-only stream, as a decode step reads the weights) and of
    2048 x 2048 matmuls in the compute dtype. Returns (bytes/s, FLOP/s).
    """
    x = torch.ones(64 * 2**20)  # 256 MiB of fp32, far larger than any cache
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    read = matmul = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        read = min(read, time.perf_counter() - start)
        start = time.perf_counter()
        a @ b
        matmul = min(matmul, time.perf_counter() - start)
    return x.numel() * x.element_size() / read, 2 * 2048**3 / matmul


def device_peaks(device, dtype, bandwidth=None, flops=None):
    """(bytes/s, FLOP/s, where they come from): the --peak-* flags win; else CUDA: the datasheet table by device
    name (None for a GPU it lacks); CPU: measured now. dtype: the compute dtype, for the matmul peak."""
    if bandwidth and flops:
        return bandwidth, flops, "from --peak-bandwidth/--peak-flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        row = gpu_peaks(name)
        if row is None:
            return bandwidth, flops, f"{name} is not in benchmark.GPU_PEAKS: pass --peak-bandwidth and --peak-flops"
        return bandwidth or row[1], flops or row[2][str(dtype).removeprefix("torch.")], f"{name} datasheet"
    measured_bandwidth, measured_flops = measure_cpu_peaks(dtype)
    return bandwidth or measured_bandwidth, flops or measured_flops, "measured on this CPU just now, best of 5"


def weights_read(model):
    """(elements, bytes) of the weights one forward reads in full: every parameter (a tied head counted once)
    except an untied input embedding, of which a forward reads only the looked-up rows."""
    params = list(model.parameters())
    n, nbytes = sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
    if not model.config.tie_word_embeddings:
        embedding = model.model.embed_tokens.weight
        n, nbytes = n - embedding.numel(), nbytes - embedding.numel() * embedding.element_size()
    return n, nbytes


def generation_roofline(model, batch, prompt_len, new_tokens, bandwidth, flops):
    """
    The least time generate() can take for B prompts of P tokens and N new tokens each, and what bounds it.
    generate() runs one prefill forward over B x P tokens, then N - 1 decode forwards of B x 1 tokens (the first
    new token comes from the prefill's logits). Each forward takes at least max(bytes / bandwidth, FLOPs / flops):
      bytes  every weight once (weights_read) and, in a decode step, the KV cache written so far:
             2 (k and v) x layers x kv_heads x head_dim x element size per row and cached position
             (decode step t attends to P + t + 1 positions);
      FLOPs  2 per weight per token (a multiply and an add), plus attention: 4 x layers x heads x head_dim per
             (query, key) pair (q.k, then the weighted sum of v); P(P+1)/2 causal pairs per row in the prefill,
             P + t + 1 per row in decode step t.
    Returns (seconds, "bandwidth" or "compute": the one that dominates summed over the forwards).
    """
    c, (B, P, N) = model.config, (batch, prompt_len, new_tokens)
    n_weights, weight_bytes = weights_read(model)
    element = model.model.embed_tokens.weight.element_size()  # the KV cache is in the compute dtype
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element  # per row and position
    pair_flops = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim  # per (query, key) pair
    forwards = [(weight_bytes, 2 * n_weights * B * P + pair_flops * B * P * (P + 1) / 2)]  # prefill
    for t in range(N - 1):  # decode steps
        forwards.append((weight_bytes + kv_bytes * B * (P + t + 1), 2 * n_weights * B + pair_flops * B * (P + t + 1)))
    seconds = sum(max(nbytes / bandwidth, n_flops / flops) for nbytes, n_flops in forwards)
    memory_time = sum(nbytes for nbytes, _ in forwards) / bandwidth
    compute_time = sum(n_flops for _, n_flops in forwards) / flops
    return seconds, "bandwidth" if memory_time >= compute_time else "compute"


def training_roofline(model, batch, seq_len, bandwidth, flops):
    """
    The least time of each phase of training_step_times() below, for B rows of T tokens (T - 1 scored each):
      forward log-probs  2 FLOPs per weight per token + attention (as in generation_roofline, causal), or
                         reading the weights once;
      backward           twice the forward's FLOPs (gradients for the activations and for the weights), or
                         reading the weights and writing an fp32 gradient for each;
      optimizer step     AdamW on fp32 master weights: read weight, gradient and two moments, write weight and
                         moments, 28 bytes per parameter (every parameter, the input embedding included).
    Returns {phase: seconds}.
    """
    c, tokens = model.config, batch * (seq_len - 1)
    n_weights, weight_bytes = weights_read(model)
    n_params = sum(p.numel() for p in model.parameters())
    pair_flops = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    forward_flops = 2 * n_weights * tokens + pair_flops * batch * (seq_len - 1) * seq_len / 2
    return {"forward log-probs": max(weight_bytes / bandwidth, forward_flops / flops),
            "backward": max((weight_bytes + 4 * n_params) / bandwidth, 2 * forward_flops / flops),
            "optimizer step": 28 * n_params / bandwidth}


def training_step_times(model, batch, seq_len, prompt_len, device, warmup, repeats):
    """
    One policy-gradient step on random tokens, timed by phase: forward log-probs (model.token_logprobs),
    backward, AdamW step. loss = -mean over "sampled" tokens of advantage * log p(token): the REINFORCE core of
    PPO/GRPO without the clipping arithmetic, which costs nothing next to the model. Returns {phase: times}.
    """
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g).to(device)  # (B, T)
    response_mask = torch.zeros(batch, seq_len - 1, device=device)  # (B, T-1): the tokens the policy "sampled"
    response_mask[:, prompt_len - 1:] = 1.0
    advantages = torch.randn(batch, 1, generator=g).to(device)  # (B, 1), one per sequence
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    phases = {"forward log-probs": [], "backward": [], "optimizer step": []}
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        logprobs = token_logprobs(model, ids)  # (B, T-1)
        loss = -(advantages * logprobs * response_mask).sum() / response_mask.sum()
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name].append(seconds)
    return phases


def free_bytes(device):
    """Memory free for us now: CUDA's own count, or the kernel's MemAvailable on a Linux CPU (else None)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def transformers_twin(model, log):
    """
    transformers' model of the same config computing with the very same weight tensors: built by from_config on
    the device (its own initialisation: for a moment a second copy of the weights), then our tensors are
    swapped in by load_state_dict(assign=True). Returns None, saying why, when that moment would not fit.
    """
    import transformers

    device, dtype = model.inv_freq.device, model.model.embed_tokens.weight.dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free = free_bytes(device)
    if free is not None and 1.1 * weight_bytes > free:
        log(f"  transformers skipped: building it needs {weight_bytes / 1e9:.1f} GB for a moment, "
            f"{free / 1e9:.1f} GB free")
        return None
    with torch.device(device):
        hf_model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**model.config.hf),
                                                                 dtype=dtype)
    hf_model.load_state_dict(model.state_dict(), assign=True)
    return hf_model.eval()


def speed_models(args, device, dtype, tmp, log):
    """model.py's model and transformers' on the same weights (None with --no-transformers or if it won't fit)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.shape:  # a real architecture, random weights made on the device: nothing read from disk
        model = random_model(SHAPES[args.shape], device, dtype)
        return model, transformers_twin(model, log) if args.transformers else None
    path = args.model
    if path is None:  # a fresh random checkpoint of the requested size, in the real HF layout
        path = make_tiny_checkpoint(os.path.join(tmp, "model"), args.model_type, vocab_size=args.vocab,
                                    hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                                    num_kv_heads=args.kv_heads, intermediate_size=args.intermediate)
    read_config(path)  # one-line error for a bad --model before anything heavy
    model = load_model(path, device=device, dtype=dtype)
    if not args.transformers:
        return model, None
    return model, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def percent(value):
    """A % column: one decimal, two significant digits below 1% (a tiny model is far from its roofline)."""
    return "-" if value is None else f"{value:.1f}%" if value >= 1 else f"{value:.2g}%"


def speed(args, log=print):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda but torch sees no CUDA device: use --device cpu")
    if args.shape and args.model:
        raise BenchmarkError("--shape builds a random model of a known architecture; --model loads a folder: give one")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, hf_model = speed_models(args, device, dtype, tmp, log)
    if hf_model is not None:
        hf_model.generation_config.eos_token_id = None  # never stop early: every row makes exactly N tokens
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    prompt_ids = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(0))
    prompts = prompt_ids.tolist()
    prompt_ids = prompt_ids.to(device)
    log(f"speed: {args.shape or cfg.model_type} {params / 1e6:.2f}M params ({weight_gb:.2f} GB; hidden "
        f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers), batch {B}, prompt {P} + {N} new tokens, greedy, "
        f"{device.type} {args.dtype}, {torch.get_num_threads()} threads, median of {args.repeats} after "
        f"{args.warmup} warm-up")
    bandwidth, flops, source = device_peaks(device, dtype, args.peak_bandwidth, args.peak_flops)
    roofline = None
    if bandwidth and flops:
        roofline, bound = generation_roofline(model, B, P, N, bandwidth, flops)
        log(f"roofline: {bandwidth / 1e9:.1f} GB/s, {flops / 1e12:.3f} TFLOP/s {args.dtype} matmul ({source}); "
            f"generating these tokens takes at least {roofline * 1e3:.3f} ms = {B * N / roofline:.1f} tokens/s "
            f"({bound}-bound)")
    else:
        log(f"roofline: unknown ({source})")

    runs = {  # name -> a function returning the new token ids per row (all equal-length prompts: no padding)
        "model.py generate": lambda: generate(model, prompts, N, eos_ids=[-1], temperature=0)[0],  # -1: no EOS
        "model.py + compile": lambda: generate(model, prompts, N, eos_ids=[-1], temperature=0, compile=True)[0],
        "transformers generate": lambda: hf_model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=N, min_new_tokens=N,
            do_sample=False, pad_token_id=0)[:, P:].tolist(),
        "no-cache loop": lambda: no_cache_generate(model, prompt_ids, N),
    }
    if not args.compile:
        del runs["model.py + compile"]
    if hf_model is None:
        del runs["transformers generate"]
        log("  transformers generate: not run (--no-transformers or it did not fit); 'vs transformers' shows -")
    results, peak_gb = {}, {}
    for name, fn in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            results[name] = run_times(fn, device, args.warmup, args.repeats)
        if device.type == "cuda":
            peak_gb[name] = torch.cuda.max_memory_allocated(device) / 1e9
        log(f"  {name}: {statistics.median(results[name][0]):.3f}s")
    base_ids = results["model.py generate"][1]
    hf_seconds = statistics.median(results["transformers generate"][0]) if hf_model is not None else None
    header = (f"{'generation':<22} {'seconds':>8} {'min-max':>13} {'tokens/s':>10} {'% roofline':>10} "
              f"{'vs transformers':>16} {'same tokens':>12}")
    if device.type == "cuda":
        header += f" {'peak GB':>8}"
    lines, summary = [header], {}
    for name, (times, ids) in results.items():
        seconds = statistics.median(times)
        same = sum(a == b for row, base in zip(ids, base_ids) for a, b in zip(row, base)) / (B * N)
        of_roofline = 100 * roofline / seconds if roofline else None
        ratio = f"{hf_seconds / seconds:.2f}x" if hf_seconds else "-"
        line = (f"{name:<22} {seconds:>8.3f} {f'{min(times):.3f}-{max(times):.3f}':>13} {B * N / seconds:>10.1f} "
                f"{percent(of_roofline):>10} {ratio:>16} {same:>12.1%}")
        if device.type == "cuda":
            line += f" {peak_gb[name]:>8.2f}"
        lines.append(line)
        summary[name] = {"seconds": seconds, "min": min(times), "max": max(times), "tokens_per_s": B * N / seconds,
                         "roofline_percent": of_roofline}
    log("\n".join(lines))
    log("(% roofline = the least possible time above / the measured time; vs transformers = tokens/s / "
        "transformers' tokens/s in this run; same tokens = share of greedy tokens equal to model.py's; compile: "
        "the first, untimed warm-up call compiles" + ("; peak GB = torch.cuda.max_memory_allocated" if
                                                        device.type == "cuda" else "") + ")")
    if args.shape and dtype != torch.float32 and hf_model is not None:
        log("(random weights in bf16: the two implementations' rounding differs and their greedy tokens part at the "
            "first near-tie, so few tokens agree; with --dtype float32 they agree exactly)")

    del hf_model, runs  # free transformers' memory (its KV cache) before the gradients and AdamW state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    summary["train"] = train_speed(args, model, device, dtype, bandwidth, flops, log)
    if device.type == "cpu":
        import resource
        log(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    return summary


def train_speed(args, model, device, dtype, bandwidth, flops, log):
    """The training step's phases as rlver trains: fp32 master weights and AdamW state, bf16 compute by autocast
    for --dtype bfloat16. Skipped, saying why, with --no-train or when that state would not fit."""
    B, T, P = args.batch, args.prompt_len + args.new_tokens, args.prompt_len
    params = sum(p.numel() for p in model.parameters())
    current = sum(p.numel() * p.element_size() for p in model.parameters())
    need, free = 16 * params - current, free_bytes(device)  # fp32 weights, gradients, 2 AdamW moments
    if not args.train:
        log("training step: skipped (--no-train)")
        return None
    if free is not None and need > 0.9 * free:
        log(f"training step: skipped, it needs ~{need / 1e9:.1f} GB more (fp32 weights, gradients and AdamW "
            f"moments: 16 bytes per parameter, activations aside) and {free / 1e9:.1f} GB are free")
        return None
    if dtype != torch.float32:  # master weights in fp32, bf16 compute (model.Transformer.autocast_dtype)
        model.float()
        model.autocast_dtype = dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases = training_step_times(model, B, T, P, device, args.warmup, args.repeats)
    least = training_roofline(model, B, T, bandwidth, flops) if bandwidth and flops else {}
    medians = {name: statistics.median(times) for name, times in phases.items()}
    total = sum(medians.values())
    lines = [f"training step (token_logprobs + policy-gradient loss + AdamW; fp32 master weights, {args.dtype} "
             f"compute), batch {B} x {T} tokens",
             f"{'phase':<22} {'seconds':>8} {'min-max':>13} {'share':>7} {'% roofline':>10}"]
    for name, times in phases.items():
        of_roofline = 100 * least[name] / medians[name] if least else None
        lines.append(f"{name:<22} {medians[name]:>8.3f} {f'{min(times):.3f}-{max(times):.3f}':>13} "
                     f"{medians[name] / total:>7.0%} {percent(of_roofline):>10}")
    of_roofline = 100 * sum(least.values()) / total if least else None
    lines.append(f"{'total':<22} {total:>8.3f} {'':>13} {1:>7.0%} {percent(of_roofline):>10}")
    if device.type == "cuda":
        lines.append(f"peak GB: {torch.cuda.max_memory_allocated(device) / 1e9:.2f}")
    log("\n".join(lines))
    return medians


# ----------------------------------------------------------------------------------------------------------
# 4b. Rollout engine: rollout.rollout against its own ablations, with a simulated user behind HTTP


def serve_simulator(latency_s, port_queue):
    """A stdlib OpenAI-compatible chat endpoint on 127.0.0.1 that answers in the simulator's format (a change
    from the request's length) after sleeping latency_s (a stand-in for a real LLM simulator's seconds per
    answer). Runs in its own process (as a real simulator server would), so it does not compete with the
    rollout for the GIL; puts its port on port_queue, then serves until terminated."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # GET /v1/models (OpenAIBackend.check)
            self.send({"object": "list", "data": [{"id": "rules", "object": "model"}]})

        def do_POST(self):  # POST /v1/chat/completions
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency_s)
            change = len(payload["messages"][-1]["content"]) % 9 - 4  # (an LLM's answer; no prompt parsing)
            content = sim.format_simulator_output("(a stand-in)", change, "I see. Go on.")
            self.send({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # (the default backlog of 5 drops simultaneous connects: 1 s SYN retries)

    server = Server(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever(poll_interval=0.05)


def start_simulator_server(latency_s):
    """serve_simulator in a child process. Returns (url, process)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    process = ctx.Process(target=serve_simulator, args=(latency_s, port_queue), daemon=True)
    process.start()
    return f"http://127.0.0.1:{port_queue.get(timeout=60)}/v1", process


ENGINE_VARIANTS = {  # name -> rollout.rollout switches
    "engine": dict(kv_reuse=True, overlap=True),
    "no-overlap": dict(kv_reuse=True, overlap=False),
    "no-kv-reuse": dict(kv_reuse=False, overlap=True),
    "lockstep re-prefill": dict(kv_reuse=False, overlap=False),  # the loop before the engine
}


def rollout_bench(args, log=print):
    if args.threads:
        torch.set_num_threads(args.threads)
    latencies = [float(x) for x in args.latencies_ms.split(",") if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_tiny_checkpoint(os.path.join(tmp, "model"), "qwen2", hidden_size=args.hidden,
                                                  num_layers=args.layers)
        read_config(path)
        model, tokenizer = load_model(path), load_tokenizer(path)
    # A random model almost never samples EOS (1 / vocab per token): every reply would run to max_new_tokens.
    # +eos_bias on the EOS logit gives replies of varied length, as a chat model's are (geometric, mean ~1/p).
    eos = tokenizer.eos_token_id
    model.lm_head.register_forward_hook(lambda m, i, logits: logits.index_add(
        -1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), args.eos_bias)))
    profiles = [p for p in sim.builtin_profiles("train")[:args.profiles] for _ in range(args.group_size)]
    seeds = [ro.rollout_seed(0, 0, j) for j in range(len(profiles))]
    log(f"rollout: {len(profiles)} dialogues ({args.profiles} profiles x group {args.group_size}), "
        f"{args.max_turns} turns x <= {args.max_new_tokens} tokens, hidden {model.config.hidden_size} x "
        f"{model.config.num_hidden_layers} layers, {torch.get_num_threads()} threads, {args.repeats} repeats")
    rows = []
    for latency in latencies:
        url, server = start_simulator_server(latency / 1000)
        backend = sim.OpenAIBackend(url, model="rules", concurrency=len(profiles))
        try:
            base = None
            for name, switches in ENGINE_VARIANTS.items():
                times, timing = [], {}
                for _ in range(args.repeats):
                    timing = {}
                    t0 = time.time()
                    dialogues = ro.rollout(model, tokenizer, profiles, backend, seeds=seeds, think=False,
                                           max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                                           timing=timing, **switches)  # (rollout runs under no_grad itself)
                    times.append(time.time() - t0)
                ids = [d.ids for d in dialogues]
                base = base or (ids, statistics.median(times))
                rows.append(dict(latency_ms=latency, variant=name, seconds=sorted(times), timing=timing,
                                 same=ids == base[0], speedup=None))
            lockstep = statistics.median(rows[-1]["seconds"])
            for r in rows[-len(ENGINE_VARIANTS):]:
                r["speedup"] = lockstep / statistics.median(r["seconds"])
        finally:
            server.terminate()
            server.join()
    lines = [f"{'sim latency':>11} {'variant':<20} {'wall s (min/med/max)':>22} {'prefill/conv':>12} "
             f"{'decode steps':>12} {'rows/step':>9} {'sim wait s':>10} {'vs lockstep':>11} {'same ids':>8}"]
    for r in rows:
        t, s = r["timing"], r["seconds"]
        lines.append(f"{r['latency_ms']:>9.0f}ms {r['variant']:<20} {s[0]:>6.2f}/{statistics.median(s):>6.2f}/"
                     f"{s[-1]:>6.2f}  {t['prefill_tokens'] / t['conversation_tokens']:>12.2f} "
                     f"{t['decode_steps']:>12} {t['active_rows'] / max(t['decode_steps'], 1):>9.1f} "
                     f"{t['simulator']:>10.2f} {r['speedup']:>10.2f}x {'yes' if r['same'] else 'NO':>8}")
    log("\n".join(lines))
    log("(prefill/conv = tokens fed by prefill / tokens in the finished conversations; vs lockstep = median wall "
        "time of 'lockstep re-prefill' / this variant's, same latency; same ids = every dialogue's tokens equal "
        "the engine's; the last run's counters)")
    return rows


# ----------------------------------------------------------------------------------------------------------
# 5. Command line


def check_policy(args):
    """Turn --policy into something that can answer, failing with one line before anything heavy is loaded."""
    if args.policy.startswith(("http://", "https://")):
        if not args.policy_model:
            raise BenchmarkError("--policy is an endpoint URL: name the model to query with --policy-model")
        client = sim.OpenAIBackend(args.policy, model=args.policy_model, api_key_env=args.policy_key_env,
                                   concurrency=args.concurrency, temperature=args.temperature,
                                   max_tokens=args.max_new_tokens, max_retries=args.retries, role="policy",
                                   timeout=args.policy_timeout,
                                   unreachable_hint=f"check that the server at {args.policy} is up and --policy is right")
        try:
            client.check()
        except sim.SimulatorError as e:
            raise BenchmarkError(str(e)) from None
        return client
    if not os.path.isdir(args.policy):
        raise BenchmarkError(f"--policy {args.policy!r} is neither a local model folder nor an http(s):// URL")
    read_config(args.policy)  # config.json present, parseable and a supported architecture
    check_weights(args.policy)  # *.safetensors complete (headers only)
    return args.policy


def blocking_file(out):
    """The nearest existing path at or above `out` when it is a file (so no --out folder can be made there),
    else None. rlver.py and eval check their --out with it before any work."""
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def check_out_dir(out):
    """--out must be (or become) a folder: checked before the evaluation, so no result is lost at the end."""
    if blocking_file(out):
        raise BenchmarkError(f"--out {out}: {blocking_file(out)} is a file, not a folder: choose another --out")


def _text_sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def setting_label(args):
    """What a plot title names (eval, rlver's periodic eval and curves): the protocol and the simulator."""
    prompts = f"official {args.protocol.upper()} prompts" if args.official_prompts else "our prompts"
    return f"{args.protocol} protocol, simulator {args.simulator_model or args.simulator}, {prompts}"


def provenance(args, profiles, profiles_path, seeds, temperature):
    """What makes a score comparable (summary.json, and every record of transcripts.jsonl): the rules, the
    simulator and its prompts, the policy's prompt and decoding, the scenarios, the seeds. args: eval's or
    rlver.py's flags (their names agree)."""
    official = profiles[0].prompts
    langs = sorted({args.lang or p.lang or sim.detect_lang(p) for p in profiles})
    policy = sorted({ro.system_prompt(args.think, lang, official) for lang in langs})
    return {"protocol": args.protocol, "simulator": args.simulator_model or args.simulator,
            "simulator_prompts": ({"source": f"official {official.source}", "files": official.files,
                                   "official_quirks": official.start_emotion_quirk} if official
                                  else {"source": "ours", "mode": args.mode}),
            "policy_prompt": {"source": official.policy_source if official else "ours (prompts/policy_system*.txt)",
                              "sha256": [_text_sha256(t) for t in policy]},
            "profiles": {"file": os.path.abspath(profiles_path) if profiles_path else "built-in test set",
                         "sha256": sim._sha256(profiles_path) if profiles_path else None, "count": len(profiles)},
            "decoding": {"temperature": temperature, "top_p": 1.0, "max_new_tokens": args.max_new_tokens},
            "seeds": seeds}


LOCK_FILE = ".lock"  # <out>/.lock: held by the one process that writes in that --out (lock_out)
HELD_LOCKS = []  # the lock files this process holds, open until it exits


def take_lock(f, mode, out):
    """fcntl.flock(f, mode) without waiting; BenchmarkError naming the holder (the file's first line) if held."""
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.readline().strip() or "another process"
        f.close()
        raise BenchmarkError(f"--out {out} is in use by {holder}: wait for it to end, or choose another "
                             f"--out") from None
    except OSError as e:  # a filesystem without flock (Lustre mounted without -o flock, some FUSE mounts)
        f.close()
        raise BenchmarkError(f"--out {out}: cannot lock {f.name} ({e.strerror}): use a filesystem with flock "
                             f"support (a local disk, NFS, Lustre mounted with -o flock)") from None


def check_not_locked(out):
    """The check of lock_out that writes nothing: another process holding --out's lock is named (BenchmarkError)."""
    if os.path.isfile(os.path.join(out, LOCK_FILE)):
        with open(os.path.join(out, LOCK_FILE), encoding="utf-8") as f:
            take_lock(f, fcntl.LOCK_SH, out)  # (a shared lock, dropped at once: it only asks)


def lock_out(out, token=""):
    """One writer per --out (rlver.py's runs and eval alike): an exclusive OS lock (fcntl.flock) on <out>/.lock,
    held until this process ends. The OS drops it when the process dies, even by SIGKILL, so a killed run never
    leaves a stale lock. The file's first line names the holder, the second holds `token` (rlver.py's ranks read
    it back). Raises BenchmarkError naming the holder when another process has the lock."""
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, LOCK_FILE), "a+", encoding="utf-8")
    take_lock(f, fcntl.LOCK_EX, out)
    f.truncate(0)
    f.write(f"{os.path.basename(sys.argv[0])} (pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n{token}\n")
    f.flush()
    HELD_LOCKS.append(f)


EVAL_FILES = ("transcripts.jsonl", "summary.json", "trajectories.svg")  # what an eval writes in its --out


def check_eval_out(args):
    """eval's --out: a folder without an earlier eval's files, unless --overwrite. Returns the earlier files."""
    check_out_dir(args.out)
    old = [name for name in EVAL_FILES if os.path.exists(os.path.join(args.out, name))]
    if old and not args.overwrite:
        raise BenchmarkError(f"--out {args.out} holds an earlier eval ({', '.join(old)}): replace it with "
                             f"--overwrite, or choose another --out")
    return old


def eval_command(args):
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else []
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        raise BenchmarkError(f"--seeds {args.seeds!r}: give distinct comma-separated integers, e.g. 0,1,2")
    if args.max_turns is not None and args.max_turns < 1:
        raise BenchmarkError("--max-turns must be at least 1")
    if not 1 <= args.max_new_tokens < args.max_context:
        raise BenchmarkError(f"--max-new-tokens {args.max_new_tokens} must be >= 1 and below --max-context "
                             f"{args.max_context}")
    if args.initial_emotion is not None and not 1 <= args.initial_emotion <= 99:
        raise BenchmarkError("--initial-emotion must be in 1..99")
    if not 0 <= args.max_parse_failure_rate <= 1:  # (NaN fails too)
        raise BenchmarkError(f"--max-parse-failure-rate {args.max_parse_failure_rate}: must be in [0, 1]")
    if not min(args.policy_timeout, args.policy_turn_deadline, args.simulator_timeout,
               args.simulator_turn_deadline) > 0:
        raise BenchmarkError("--policy-timeout, --policy-turn-deadline, --simulator-timeout and "
                             "--simulator-turn-deadline must be > 0 seconds")
    check_eval_out(args)  # before anything is written
    check_not_locked(args.out)
    official = args.official_prompts and sim.load_official_prompts(   # the authors' prompts (simulator.py 3b),
        args.official_prompts, args.protocol, args.think, args.official_quirks, args.simulator)   # on every profile
    profiles_path = args.profiles or (sim.official_profiles_path(args.official_prompts)
                                      if official and args.protocol == "sage" else None)
    profiles = sim.load_profiles(profiles_path) if profiles_path else sim.builtin_profiles("test")
    profiles = [replace(p, prompts=official) for p in (profiles[:args.limit] if args.limit else profiles)]
    policy, tokenizer = check_policy(args), None
    try:  # (a local simulator model is loaded here: the policy was checked first, cheaply)
        client = {}  # the HTTP client's knobs, for an endpoint simulator
        if args.simulator.startswith(("http://", "https://")):
            client = dict(timeout=args.simulator_timeout)
        backend = sim.make_backend(args.simulator, model_name=args.simulator_model,
                                   api_key_env=args.simulator_key_env, device=args.device, **client)
    except ValueError as e:  # unknown spec or malformed URL
        raise BenchmarkError(str(e)) from None
    backend.check()
    lock_out(args.out)  # one eval per --out; checked again under the lock: two evals started at once
    for name in check_eval_out(args):  # --overwrite: the earlier eval goes now, so old and new never mix
        os.remove(os.path.join(args.out, name))
    if isinstance(policy, str):  # the heavy part starts here, after every cheap check passed
        dtype = DTYPES[args.dtype]
        policy, tokenizer = load_model(policy, device=args.device, dtype=dtype), load_tokenizer(policy)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["provenance"] = provenance(args, profiles, profiles_path, seeds, args.temperature)
    return evaluate(policy, tokenizer, profiles, backend, seeds=seeds, max_turns=args.max_turns, mode=args.mode,
                    think=args.think, max_new_tokens=args.max_new_tokens, max_context=args.max_context,
                    temperature=args.temperature,
                    out_dir=args.out, config=config, protocol=args.protocol, lang=args.lang,
                    initial_emotion=args.initial_emotion, max_parse_failure_rate=args.max_parse_failure_rate,
                    turn_deadline=args.simulator_turn_deadline, policy_turn_deadline=args.policy_turn_deadline,
                    title=f"{args.policy_model or os.path.basename(args.policy.rstrip('/'))} ({setting_label(args)})")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="RLVER evaluation (SAGE-style) and speed benchmarks.")
    commands = p.add_subparsers(dest="command", required=True)
    e = commands.add_parser("eval", help="score a policy against the simulated users",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--policy", required=True, help="local HF model folder, or http(s)://host:port/v1 endpoint")
    e.add_argument("--policy-model", default=None, help="model name to request from a --policy endpoint")
    e.add_argument("--policy-key-env", default="OPENAI_API_KEY", help="env var holding the policy endpoint's key")
    e.add_argument("--simulator", default="rules", help="'rules', an OpenAI-compatible URL, or a local model folder")
    e.add_argument("--simulator-model", default=None)
    e.add_argument("--simulator-key-env", default="OPENAI_API_KEY")
    e.add_argument("--mode", choices=sim.MODES, default="vanilla")
    e.add_argument("--profiles", default=None, help="profile JSONL (ours or public RLVER); default: built-in test set")
    e.add_argument("--limit", type=int, default=0, help="use only the first N profiles (0: all)")
    e.add_argument("--official-prompts", default=None, metavar="DIR",
                   help="play the authors' own prompts, read from your checkout of their digitalhuman repository "
                        "(its root, SAGE/ or RLVER/): --protocol sage reads SAGE's simulator, agent prompt and "
                        "(without --profiles) its 100 scenarios; rlver reads RLVER's simulator and policy prompts")
    e.add_argument("--official-quirks", action="store_true",
                   help="with --official-prompts under rlver: every analysis call sees the start emotion, as "
                        "the official trainer's code does (the paper: the live emotion)")
    e.add_argument("--protocol", choices=list(sim.PROTOCOLS), default="sage",
                   help="dialogue rules (simulator.PROTOCOLS): sage = SAGE's test loop (start 40, +-10, success 100, "
                        "failure < 10, goodbye, 9 scored replies, two-stage simulator); rlver = RLVER's training "
                        "simulator; classic = ours (start 50, +-30, one call)")
    e.add_argument("--max-turns", type=int, default=None, help="scored policy replies (default: the protocol's)")
    e.add_argument("--lang", choices=sim.LANGS, default=None, help="force the template language (default: per profile)")
    e.add_argument("--initial-emotion", type=int, default=None,
                   help="start emotion for profiles without one (default: the protocol's: sage 40, rlver 30)")
    e.add_argument("--seeds", default="0", help="comma-separated: each profile is played once per seed")
    e.add_argument("--think", action=argparse.BooleanOptionalAction, default=False,
                   help="think-then-say system prompt (use it for policies trained with --think)")
    e.add_argument("--max-new-tokens", type=int, default=2048, help="per policy turn (SAGE's practice: replies "
                   "longer than 350 Chinese characters are common; a reply cut here is counted and warned)")
    e.add_argument("--max-context", type=int, default=8192, help="a local policy's dialogue ends (max_context) "
                   "before a turn could outgrow this many tokens")
    e.add_argument("--temperature", type=float, default=0.0, help="policy sampling temperature (0: greedy)")
    e.add_argument("--concurrency", type=int, default=16, help="parallel requests to a policy endpoint")
    e.add_argument("--retries", type=int, default=4, help="retries per policy endpoint request")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    e.add_argument("--out", default="runs/eval", help="directory for transcripts.jsonl, summary.json, trajectories.svg")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier eval in --out (refused without it)")
    e.add_argument("--max-parse-failure-rate", type=float, default=0.0,
                   help="refuse to score when more than this share of simulator turns stays unparseable after "
                        "2 re-asks (default 0: SAGE never scores such a turn)")
    e.add_argument("--policy-timeout", type=float, default=120.0, help="seconds per HTTP request to a policy endpoint")
    e.add_argument("--policy-turn-deadline", type=float, default=600.0,
                   help="seconds for all policy endpoint answers of one turn")
    e.add_argument("--simulator-timeout", type=float, default=120.0, help="seconds per HTTP request to a simulator endpoint")
    e.add_argument("--simulator-turn-deadline", type=float, default=600.0,
                   help="seconds for all simulator answers of one turn")
    e.set_defaults(func=eval_command)

    lb = commands.add_parser("leaderboard", help="side-by-side Score / Success / Failure of several systems",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lb.add_argument("files", nargs="+", help="SAGE result JSONL files and/or our eval outputs (transcripts.jsonl or its dir)")
    lb.add_argument("--json", action="store_true", help="print a JSON list of {name, score, success, failure, dialogues}")
    lb.add_argument("--plot", default=None, help="write an SVG of each system's mean emotion per turn")
    lb.add_argument("--versus", default=None, help="per-scenario wins / ties / losses against this system (its name "
                    "as the table shows it; case does not matter, e.g. gpt-4.1 or GPT-4.1)")
    lb.add_argument("--allow-mixed", action="store_true", help="rank systems whose protocol, scenarios or simulator "
                    "prompts differ (the differing fields marked *); without it such a table is refused")
    lb.set_defaults(func=leaderboard_command)

    rp = commands.add_parser("replay", help="play SAGE's published result files back through the eval loop (no LLM): "
                             "do the loop's rules and parser give the published emotions and Score?")
    rp.add_argument("files", nargs="+", help="SAGE result JSONL files (SAGE/dataset/<simulator>_based_simulator/*.jsonl)")
    rp.add_argument("--official-prompts", required=True, metavar="DIR",
                    help="your checkout of the authors' digitalhuman repository (its root or SAGE/): the prompts "
                         "and the scenarios the files were played on")
    rp.set_defaults(func=replay_command)

    s = commands.add_parser("speed", help="generation tokens/s and training step time",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default=None, help="local HF model folder; default: a fresh random checkpoint")
    s.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="a real architecture (the published config) with random weights made in memory on the device")
    s.add_argument("--model-type", choices=["qwen2", "llama", "qwen3"], default="qwen2")
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--kv-heads", type=int, default=2)
    s.add_argument("--intermediate", type=int, default=768)
    s.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary of the fresh checkpoint")
    s.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers' generate on the same weights (skipped anyway if it would not fit)")
    s.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a training step (skipped anyway if fp32 weights + AdamW state would not fit)")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time model.generate(compile=True) (torch.compile of the decode step)")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    s.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default; on a busy CPU, 1 avoids OpenMP stalls)")
    s.add_argument("--peak-bandwidth", type=float, default=None,
                   help="peak memory bytes/s for the roofline (default: CPU measured, GPU from benchmark.GPU_PEAKS)")
    s.add_argument("--peak-flops", type=float, default=None,
                   help="peak matmul FLOP/s in --dtype for the roofline (default: as --peak-bandwidth)")
    s.set_defaults(func=speed)

    r = commands.add_parser("rollout", help="the rollout engine against its ablations, HTTP simulator latencies",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--model", default=None, help="local HF model folder; default: a fresh random checkpoint")
    r.add_argument("--hidden", type=int, default=256)
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--profiles", type=int, default=4)
    r.add_argument("--group-size", type=int, default=4)
    r.add_argument("--max-turns", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--eos-bias", type=float, default=3.5, help="added to the EOS logit: replies of varied length")
    r.add_argument("--latencies-ms", default="0,50,200", help="simulator answer delays to measure")
    r.add_argument("--repeats", type=int, default=3, help="runs per variant and latency (min/median/max)")
    r.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    r.set_defaults(func=rollout_bench)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        args.func(args)
    except (BenchmarkError, CheckpointError, sim.ProfileError, sim.SimulatorError) as e:
        print(f"benchmark.py {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line; os._exit does not wait for HTTP worker threads
        print(f"benchmark.py {args.command}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)


if __name__ == "__main__":
    main()
