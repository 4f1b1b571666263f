"""benchmark.py: how good is a policy at empathetic dialogue, and how fast is our model code?

    python benchmark.py eval --policy runs/rlver/checkpoint --simulator rules --seeds 0,1,2
    python benchmark.py eval --policy http://localhost:8000/v1 --policy-model gpt-4o --simulator rules
    python benchmark.py leaderboard runs/eval gpt-4.1_result.jsonl --versus gpt-4.1
    python benchmark.py replay SAGE/dataset/*/*_result.jsonl --official-prompts digitalhuman   # no LLM
    python benchmark.py speed --device cuda --dtype bfloat16 --compile
    python benchmark.py rollout --latencies-ms 0,50,200

`eval` is SAGE's benchmark (arXiv 2505.02847) under --protocol's rules: after each policy reply emotion <-
clamp(emotion + change, 0, 100) until simulator.dialogue_end; score = mean FINAL emotion. rlver.py imports this
file for its evaluation, the --out lock and the curves, so the benchmarks' heavy imports stay inside them."""

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
from model import (CheckpointError, check_weights, generate, load_model, load_tokenizer, make_tiny_checkpoint,
                   read_config, token_logprobs)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BenchmarkError(ValueError):
    """A problem the user can fix (bad flag, bad path, unreachable endpoint): printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# 1. Evaluation: the score, the report files, evaluate()


def summarize(episodes):
    """The SAGE-style numbers over finished simulator.Episodes (one per dialogue)."""
    if not episodes:
        raise ValueError("no dialogues to summarize")
    n, outcomes = len(episodes), [sim.final_outcome(ep.emotion, ep.profile.protocol) for ep in episodes]
    return {"score": sum(ep.emotion for ep in episodes) / n,  # mean final emotion, 0..100: the headline number
            "success": outcomes.count("success"), "failure": outcomes.count("failure"),
            "success_rate": outcomes.count("success") / n, "failure_rate": outcomes.count("failure") / n,
            "mean_turns": sum(len(ep.turns) for ep in episodes) / n, "dialogues": n,
            **{k: sum(getattr(ep, k) for ep in episodes) for k in sim.COUNTS}}  # cut replies, cut thoughts, ...


def profile_table(episodes):
    """One row per profile over its seeds: final emotions, their mean, mean turns, outcomes."""
    rows = {}
    for ep in episodes:
        rows.setdefault(ep.profile.id, []).append(ep)
    width = max(12, *(len(pid) for pid in rows))
    lines = [f"{'profile':<{width}}  {'final emotion per seed':<24} {'mean':>6} {'turns':>6}  outcomes"]
    for pid, eps in rows.items():
        marks = "".join({"success": "S", "failure": "F", "goodbye": "G"}.get(ep.end_reason, ".") for ep in eps)
        lines.append(f"{pid:<{width}}  {' '.join(str(ep.emotion) for ep in eps):<24} "
                     f"{statistics.mean(ep.emotion for ep in eps):>6.1f} "
                     f"{statistics.mean(len(ep.turns) for ep in eps):>6.1f}  {marks}")
    return "\n".join(lines + ["(outcomes per seed: S success (100), F failure (0; under sage below 10), G said "
                              "goodbye, . ended at max turns)"])


def report(episodes, out_dir, *, seeds=None, title="", config=None, max_turns=None, log=print):
    """Summarise episodes (episodes[i] played with seeds[i], default 0), print it, write EVAL_FILES into out_dir."""
    seeds = list(seeds) if seeds is not None else [0] * len(episodes)
    summary = summarize(episodes)
    per_seed = {s: summarize([ep for ep, es in zip(episodes, seeds) if es == s])["score"] for s in dict.fromkeys(seeds)}
    config = config or {}
    summary.update(per_seed_scores={str(s): score for s, score in per_seed.items()},
                   seed_mean=statistics.mean(per_seed.values()),
                   seed_std=statistics.stdev(per_seed.values()) if len(per_seed) > 1 else 0.0,  # sample std (n-1)
                   parse_failures=sum(ep.parse_failures for ep in episodes), config=config,
                   provenance=config.get("provenance"))
    log(profile_table(episodes))
    headline = (f"score {summary['score']:.1f} (seeds: {summary['seed_mean']:.1f} ± {summary['seed_std']:.1f}) | "
                f"success {summary['success']} ({summary['success_rate']:.0%}) | failure {summary['failure']} "
                f"({summary['failure_rate']:.0%}) | mean turns {summary['mean_turns']:.2f} | {len(episodes)} dialogues")
    log(f"{title + ': ' if title else ''}{headline}")
    for line in sim.count_warnings(summary, title or "evaluation"):   # cut replies, cut thoughts, wild changes
        log(line)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "transcripts.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(sim.transcript(ep, seed=seed, provenance=summary["provenance"]), ensure_ascii=False)
                     + "\n" for ep, seed in zip(episodes, seeds))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    max_turns = max_turns or config.get("max_turns") or max(len(ep.turns) for ep in episodes) or 1
    write_svg(os.path.join(out_dir, "trajectories.svg"), list(map(sim.trajectory, episodes)), max_turns=max_turns,
              title=f"{title + ' - ' if title else ''}Sentient-style score {summary['score']:.1f}",
              subtitle=headline, labels=[f"{ep.profile.id} (seed {s})" for ep, s in zip(episodes, seeds)],
              protocol=episodes[0].profile.protocol)
    log(f"wrote {out_dir}/transcripts.jsonl, summary.json, trajectories.svg")
    return summary


def evaluate(policy, tokenizer, profiles, backend, out_dir, *, seeds=(0,), max_turns=None, mode="vanilla", think=False,
             max_new_tokens=2048, max_context=8192, temperature=0.0, log=print, title="", config=None,
             protocol="sage", max_parse_failure_rate=0.0, turn_deadline=600.0, policy_turn_deadline=600.0):
    """Play every profile once per seed and report(). policy: a model.Transformer (played by rollout.rollout, as in
    training) or a chat backend such as simulator.OpenAIBackend (rollout.endpoint_rollout)."""
    local = isinstance(policy, torch.nn.Module)
    max_turns = max_turns or sim.protocol_of(protocol).max_turns
    # the protocol's start emotion and language; openings written once, shared by every seed (as SAGE's first_talk)
    profiles = sim.prepare_profiles(profiles, backend, protocol=protocol, mode=mode, log=log)
    config = dict(config or {}, seeds=list(seeds), max_turns=max_turns, mode=mode, think=think, protocol=protocol,
                  max_new_tokens=max_new_tokens, temperature=temperature, n_profiles=len(profiles))
    episodes, episode_seeds = [], []
    for seed in seeds:
        start = time.time()
        log(f"seed {seed}: {len(profiles)} dialogues, {'local model' if local else 'endpoint'} policy vs {backend!r}")
        if local:  # each dialogue its own random stream, as in training (greedy at temperature 0)
            played = [d.episode for d in ro.rollout(
                policy, tokenizer, profiles, backend, think=think, max_turns=max_turns, max_new_tokens=max_new_tokens,
                max_context=max_context, temperature=temperature, mode=mode, turn_deadline=turn_deadline,
                seeds=[ro.rollout_seed(seed, 0, i) for i in range(len(profiles))])]
        else:  # (an endpoint gets no seed: with temperature 0 the seeds repeat, above 0 they are not reproducible)
            played = ro.endpoint_rollout(policy, profiles, backend, think=think, mode=mode, max_turns=max_turns,
                                         log=log, turn_deadline=turn_deadline,
                                         policy_turn_deadline=policy_turn_deadline)
        log(f"seed {seed}: score {summarize(played)['score']:.1f} in {time.time() - start:.1f}s")
        episodes += played
        episode_seeds += [seed] * len(played)
    sim.check_parse_health(episodes, max_parse_failure_rate, "evaluation", warn=log)
    return report(episodes, out_dir, seeds=episode_seeds, title=title, config=config, max_turns=max_turns, log=log)


# ----------------------------------------------------------------------------------------------------------
# 2. The eval command: every check before any work, the provenance, one writer per --out


def setting_label(args):
    """What a plot title names (eval, rlver's periodic eval and curves): the protocol and the simulator."""
    prompts = f"official {args.protocol.upper()} prompts" if args.official_prompts else "our prompts"
    return f"{args.protocol} protocol, simulator {args.simulator_model or args.simulator}, {prompts}"


def provenance(args, profiles, profiles_path, seeds, temperature):
    """What makes a score comparable (summary.json, every transcript). args: eval's or rlver.py's flags."""
    official = profiles[0].prompts
    policy = sorted({ro.system_prompt(args.think, p.lang or sim.detect_lang(p), official) for p in profiles})
    return {"protocol": args.protocol, "simulator": args.simulator_model or args.simulator,
            "simulator_prompts": ({"source": f"official {official.source}", "files": official.files,
                                   "official_quirks": official.start_emotion_quirk} if official
                                  else {"source": "ours", "mode": args.mode}),
            "policy_prompt": {"source": official.policy_source if official else "ours (prompts/policy_system*.txt)",
                              "sha256": [hashlib.sha256(t.encode()).hexdigest() for t in policy]},
            "profiles": {"file": os.path.abspath(profiles_path) if profiles_path else "built-in test set",
                         "sha256": sim._sha256(profiles_path) if profiles_path else None, "count": len(profiles)},
            "decoding": {"temperature": temperature, "top_p": 1.0, "max_new_tokens": args.max_new_tokens},
            "seeds": seeds}


LOCK_FILE = ".lock"  # <out>/.lock: held by the one process that writes in that --out (lock_out)
HELD_LOCKS = []  # the lock files this process holds, open until it exits
EVAL_FILES = ("transcripts.jsonl", "summary.json", "trajectories.svg")  # what an eval writes in its --out


def open_locked(out, mode):
    """<out>/.lock, flock(mode)-ed without waiting; if another process holds it, BenchmarkError naming the holder."""
    f = open(os.path.join(out, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.seek(0)
        problem = f"is in use by {f.readline().strip() or 'another process'}: wait for it to end, or choose another"
    except OSError as e:  # a filesystem without flock (Lustre mounted without -o flock, some FUSE mounts)
        problem = (f"cannot lock {f.name} ({e.strerror}): use a filesystem with flock support (a local disk, NFS, "
                   f"Lustre mounted with -o flock), or another")
    f.close()
    raise BenchmarkError(f"--out {out} {problem} --out")


def check_out(out, earlier, overwrite, resume=None):  # resume None: eval's (no --resume); returns the earlier files
    """Eval's and rlver.py's --out check: no file, no folder in use, no `earlier` files unless --overwrite/--resume."""
    parent = os.path.abspath(out)
    while not os.path.exists(parent):  # the nearest existing path: no folder can be made under a file
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BenchmarkError(f"--out {out}: {parent} is a file, not a folder: choose another --out")
    lock = os.path.join(out, LOCK_FILE)
    if os.path.isfile(lock) and lock not in [f.name for f in HELD_LOCKS]:  # (rechecked under this process's lock)
        open_locked(out, fcntl.LOCK_SH).close()
    old = [name for name in earlier if os.path.exists(os.path.join(out, name))]
    if old and not (overwrite or resume):
        what, hint = ("eval", "") if resume is None else ("run", "continue it with --resume, ")
        raise BenchmarkError(f"--out {out} holds an earlier {what} ({', '.join(old)}): {hint}replace it with "
                             f"--overwrite, or choose another --out")
    return old


def lock_out(out, check, token=""):
    """One writer per --out: an exclusive flock the OS drops when this process dies, even by SIGKILL (line 1 names the
    holder, line 2 is `token`, for rlver.py's ranks); returns check() run again under it (a run may have ended)."""
    os.makedirs(out, exist_ok=True)
    f = open_locked(out, fcntl.LOCK_EX)
    f.truncate(0)
    f.write(f"{os.path.basename(sys.argv[0])} (pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n{token}\n")
    f.flush()
    HELD_LOCKS.append(f)
    return check()


def check_policy(args):
    """A reachable endpoint's client, or a checked model folder's path (loaded after every cheap check)."""
    if not args.policy.startswith(("http://", "https://")):
        if not os.path.isdir(args.policy):
            raise BenchmarkError(f"--policy {args.policy!r} is neither a local model folder nor an http(s):// URL")
        read_config(args.policy)  # config.json present, parseable and a supported architecture
        check_weights(args.policy)  # *.safetensors complete (headers only)
        return args.policy
    if not args.policy_model:
        raise BenchmarkError("--policy is an endpoint URL: name the model to query with --policy-model")
    client = sim.OpenAIBackend(args.policy, model=args.policy_model, api_key_env=args.policy_key_env, role="policy",
                               concurrency=args.concurrency, temperature=args.temperature, timeout=args.policy_timeout,
                               max_tokens=args.max_new_tokens, max_retries=args.retries,
                               unreachable_hint=f"check that the server at {args.policy} is up and --policy is right")
    client.check()
    return client


def eval_command(args):
    if args.max_new_tokens >= args.max_context:
        raise BenchmarkError(f"--max-new-tokens {args.max_new_tokens} must be >= 1 and below --max-context "
                             f"{args.max_context}")
    check_out(args.out, EVAL_FILES, args.overwrite)  # before anything is written
    official = args.official_prompts and sim.load_official_prompts(   # the authors' prompts, on every profile
        args.official_prompts, args.protocol, args.think, args.official_quirks, args.simulator)
    profiles_path = args.profiles or (sim.official_profiles_path(args.official_prompts)
                                      if official and args.protocol == "sage" else None)
    profiles = sim.load_profiles(profiles_path) if profiles_path else sim.builtin_profiles("test")
    profiles = [replace(p, prompts=official) for p in (profiles[:args.limit] if args.limit else profiles)]
    policy, tokenizer = check_policy(args), None
    backend = sim.backend_from_flags(args, args.device)  # (a local simulator model loads after the policy's check)
    for name in lock_out(args.out, lambda: check_out(args.out, EVAL_FILES, args.overwrite)):  # one eval per --out
        os.remove(os.path.join(args.out, name))  # --overwrite: the earlier eval goes now, so old and new never mix
    if isinstance(policy, str):  # the heavy part starts here, after every cheap check passed
        policy, tokenizer = load_model(policy, device=args.device, dtype=DTYPES[args.dtype]), load_tokenizer(policy)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["provenance"] = provenance(args, profiles, profiles_path, args.seeds, args.temperature)
    return evaluate(policy, tokenizer, profiles, backend, seeds=args.seeds, max_turns=args.max_turns, mode=args.mode,
                    think=args.think, max_new_tokens=args.max_new_tokens, max_context=args.max_context,
                    temperature=args.temperature, out_dir=args.out, config=config, protocol=args.protocol,
                    max_parse_failure_rate=args.max_parse_failure_rate, turn_deadline=args.simulator_turn_deadline,
                    policy_turn_deadline=args.policy_turn_deadline,
                    title=f"{args.policy_model or os.path.basename(args.policy.rstrip('/'))} ({setting_label(args)})")


def comma_list(convert, rule, ok=bool):
    """An argparse type= for a comma-separated list: items convert()-ed, non-empty, ok(list); else '<text>: <rule>'."""
    def parse(text):
        try:
            values = [convert(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not ok(values):
            raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
        return values
    return parse


POSITIVE, COUNT, SECONDS = sim.in_range(1, kind=int), sim.in_range(0, kind=int), sim.in_range(0, above=True)


def eval_flags(commands):
    e = commands.add_parser("eval", help="score a policy against the simulated users",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--policy", required=True, help="local HF model folder, or http(s)://host:port/v1 endpoint")
    e.add_argument("--policy-model", default=None, help="model name to request from a --policy endpoint")
    e.add_argument("--policy-key-env", default="OPENAI_API_KEY", help="env var holding the policy endpoint's key")
    sim.add_simulator_flags(e.add_argument, protocol="sage", max_parse_failure_rate=0.0)
    e.add_argument("--profiles", default=None, help="profile JSONL (ours or public RLVER); default: built-in test set")
    e.add_argument("--limit", type=COUNT, default=0, help="use only the first N profiles (0: all)")
    seeds = comma_list(int, "give distinct comma-separated integers, e.g. 0,1,2", lambda v: len(set(v)) == len(v))
    e.add_argument("--seeds", type=seeds, default="0", help="comma-separated: each profile is played once per seed")
    e.add_argument("--think", action=argparse.BooleanOptionalAction, default=False, help="think-then-say prompt")
    e.add_argument("--max-new-tokens", type=POSITIVE, default=2048, help="per policy turn (a cut reply is warned)")
    e.add_argument("--max-context", type=POSITIVE, default=8192, help="a local policy's dialogue's token limit")
    e.add_argument("--temperature", type=float, default=0.0, help="policy sampling temperature (0: greedy)")
    e.add_argument("--concurrency", type=POSITIVE, default=16, help="parallel requests to a policy endpoint")
    e.add_argument("--retries", type=COUNT, default=4, help="retries per policy endpoint request")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", choices=list(DTYPES), default="float32")
    e.add_argument("--out", default="runs/eval", help="folder for transcripts.jsonl, summary.json, trajectories.svg")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier eval in --out (refused without it)")
    e.add_argument("--policy-timeout", type=SECONDS, default=120.0, help="seconds per policy endpoint request")
    e.add_argument("--policy-turn-deadline", type=SECONDS, default=600.0, help="seconds for a turn's policy answers")
    e.set_defaults(func=eval_command)


# ----------------------------------------------------------------------------------------------------------
# 3. Leaderboard. A SAGE result file (test_npc.py's) has a record per scenario: "id", "emo_point" (the final
#    emotion), "history" (user turns carry "emotion-point"). SAGE prints Score = mean final emotion rounded half up,
#    Success = finals >= 100, Failure = finals < 10 (our records: their protocol's failure line).


def finite(value):
    """A finite int/float (None, NaN, text and booleans are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_record(r, folder):
    """A SAGE result record or one of our transcripts -> ((id, final, trajectory, protocol), provenance); a SAGE
    file's simulator is named by its folder (dataset/<simulator>_based_simulator/)."""
    if "emo_point" in r:
        traj = [t["emotion-point"] for t in r["history"] if t.get("role") == "user"] or [r["emo_point"]]
        simulator = folder.removesuffix("_based_simulator") if folder.endswith("_based_simulator") else "unknown"
        return (str(r["id"]), r["emo_point"], traj, "sage"), {
            "protocol": "sage", "simulator_prompts": {"source": "official SAGE"}, "simulator": simulator}
    protocol = r.get("protocol", "classic")
    traj = [r["initial_emotion"]] + [t["emotion"] for t in r["turns"]]
    return (str(r["profile_id"]), r["final_emotion"], traj, protocol), r.get("provenance") or {
        "protocol": protocol, "simulator": "unknown", "simulator_prompts": {"source": "unknown"}}


def read_system(path):
    """A results file or eval folder -> {name, dialogues: [(id, final, trajectory, protocol)], provenance, records}."""
    path = os.path.join(path, "transcripts.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise BenchmarkError(f"no such results file {path}")
    dialogues, records, folder = [], [], os.path.basename(os.path.dirname(os.path.abspath(path)))
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
                dialogue = read_record(records[-1], folder)[0]
            except (ValueError, KeyError, TypeError) as e:
                raise BenchmarkError(f"{path}:{lineno} is neither a SAGE result record (id, emo_point, "
                                     f"history) nor one of our transcripts ({e!r})") from None
            bad = [v for v in [dialogue[1], *dialogue[2]] if not finite(v)]  # (a string, null, ...)
            if bad:
                raise BenchmarkError(f"{path}:{lineno}: an emotion value is {bad[0]!r}, not a number: fix or drop "
                                     f"that record")
            dialogues.append(dialogue)
    if not dialogues:
        raise BenchmarkError(f"{path} has no records")
    name = folder if os.path.basename(path) == "transcripts.jsonl" else os.path.basename(path).removesuffix(".jsonl")
    return {"name": name.removesuffix("_result"), "dialogues": dialogues,
            "provenance": read_record(records[0], folder)[1], "records": records}


def round_half_up(value):
    """SAGE's printed Score: 61.25 -> 61.3 (Python's round and %.1f give 61.2)."""
    return float(decimal.Decimal(repr(value)).quantize(decimal.Decimal("0.1"), decimal.ROUND_HALF_UP))


def leaderboard_rows(systems):
    """Score / Success / Failure / dialogues and the provenance shown (the scenarios as a count and a digest of
    their ids, so two files of the same scenarios agree) per system, best score first."""
    rows = []
    for system in systems:
        prov, ids = system["provenance"], sorted({d[0] for d in system["dialogues"]})
        outcomes = [sim.final_outcome(final, protocol) for _, final, _, protocol in system["dialogues"]]
        decoding = prov.get("decoding")
        rows.append({"name": system["name"], "dialogues": len(outcomes),
                     "score": round_half_up(sum(d[1] for d in system["dialogues"]) / len(outcomes)),
                     "success": outcomes.count("success"), "failure": outcomes.count("failure"),
                     "protocol": prov["protocol"], "simulator": prov["simulator"],
                     "simulator_prompts": prov["simulator_prompts"]["source"],
                     "profiles": f"{len(ids)} ids #{hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:8]}",
                     "decoding": f"T={decoding['temperature']:g} max_new={decoding['max_new_tokens']}"
                     if decoding else "-"})
    return sorted(rows, key=lambda r: -r["score"])


def versus(systems, name):
    """Per-scenario wins / ties / losses of every other system against `name` (several seeds: the mean final)."""
    mean = {}   # system -> scenario id -> mean final emotion
    for s in systems:
        finals = {}
        for pid, final, _, _ in s["dialogues"]:
            finals.setdefault(pid, []).append(final)
        mean[s["name"]] = {pid: statistics.mean(v) for pid, v in finals.items()}
    name = next((n for n in mean if n.lower() == name.lower()), name)   # as a README writes it: GPT-4.1
    if name not in mean:
        raise BenchmarkError(f"--versus {name!r} is none of the systems {sorted(mean)}")
    base, rows = mean.pop(name), []
    for other, theirs in mean.items():
        diffs = [theirs[i] - base[i] for i in set(base) & set(theirs)]   # the scenarios both played
        rows.append({"name": other, "versus": name, "scenarios": len(diffs), "wins": sum(d > 0 for d in diffs),
                     "ties": diffs.count(0), "losses": sum(d < 0 for d in diffs)})
    return rows


def leaderboard_command(args):
    systems = [read_system(path) for path in args.files]
    names = [s["name"] for s in systems]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"two files give the same system name ({names}); rename one")
    rows = leaderboard_rows(systems)
    mixed = [k for k in ("protocol", "profiles", "simulator_prompts") if len({r[k] for r in rows}) > 1]
    if mixed and not args.allow_mixed:  # a ranking across a difference in rules or scenarios compares nothing
        values = ", ".join(f"{r['name']}: {r[mixed[0]]}" for r in rows)
        raise BenchmarkError(f"the systems differ in {mixed[0]} ({values}): their scores are not comparable; "
                             f"rank them anyway with --allow-mixed")
    if mixed:
        print(f"WARNING: --allow-mixed: the systems differ in {', '.join(mixed)} (marked *): the scores are not "
              f"comparable", file=sys.stderr)
    vs = versus(systems, args.versus) if args.versus else []
    if args.plot:
        write_leaderboard_svg(args.plot, systems)
    if args.json:
        print(json.dumps(rows if not vs else {"leaderboard": rows, "versus": vs}, ensure_ascii=False))
        return rows
    width, fields = max(6, *map(len, names)), ("protocol", "simulator", "simulator_prompts", "profiles", "decoding")
    print(f"{'system':<{width}}  {'Score':>6} {'Success':>8} {'Failure':>8} {'dialogues':>10}  " + " | ".join(fields))
    for r in rows:
        print(f"{r['name']:<{width}}  {r['score']:>6.1f} {r['success']:>8d} {r['failure']:>8d} {r['dialogues']:>10d}  "
              + " | ".join(r[k] + ("*" if k in mixed else "") for k in fields))
    for r in vs:
        print(f"{r['name']} vs {r['versus']}: {r['wins']} wins, {r['ties']} ties, {r['losses']} losses "
              f"on {r['scenarios']} scenarios")
    return rows


def leaderboard_flags(commands):
    lb = commands.add_parser("leaderboard", help="side-by-side Score / Success / Failure of several systems")
    lb.add_argument("files", nargs="+", help="SAGE result JSONL files and/or our eval outputs (or their folders)")
    lb.add_argument("--json", action="store_true", help="print the rows as JSON")
    lb.add_argument("--plot", default=None, help="write an SVG of each system's mean emotion per turn")
    lb.add_argument("--versus", default=None, help="per-scenario wins / ties / losses against this system (case-blind)")
    lb.add_argument("--allow-mixed", action="store_true", help="rank systems whose protocol, scenarios or simulator "
                    "prompts differ (marked *); refused without it")
    lb.set_defaults(func=leaderboard_command)


# ----------------------------------------------------------------------------------------------------------
# 4. Replay: a published record holds the agent's replies and, per user turn after the opening, the simulator's
#    "planning" (with its change), "thinking", reply ("content") and "emotion-point". Played back through the eval
#    loop in SAGE's raw format, its clamp, cap, ending rules and parser must give that emotion after every turn.


def published_turns(record):
    history = record["history"]
    return [m["content"] for m in history if m["role"] == "assistant"], [m for m in history if m["role"] == "user"][1:]


def replay_policy(profiles, records):
    """A chat opened as profile p's, holding k agent replies, gets p's published reply k + 1 (past the end: "")."""
    replies = {p.opening: published_turns(records[p.id])[0] for p in profiles}

    def answer(messages):   # rollout.policy_messages: [system, opening, assistant, user, ...]
        agents, k = replies[messages[1]["content"]], sum(m["role"] == "assistant" for m in messages)
        return agents[k] if k < len(agents) else ""
    return sim.Scripted(answer)


def replay_simulator(prompts, profiles, records):
    """The k-th call of a kind (analysis: it starts as the analysis template does; else reply) of the scenario whose
    scene it holds gets that scenario's published user turn k as SAGE's simulator wrote it."""
    turns = {p.scenario: published_turns(records[p.id])[1] for p in profiles}
    analysis_start, calls = prompts.analysis.split("{{")[0], {}
    past_the_end = {"planning": {"change": 0}, "thinking": "", "content": ""}

    def answer(messages):
        (message,) = messages
        scenes = [s for s in turns if s in message["content"]]
        if len(scenes) != 1:
            raise sim.SimulatorError(f"replay: a simulator request holds {len(scenes)} of the scenarios' scenes")
        kind = "analysis" if message["content"].startswith(analysis_start) else "reply"
        k = calls[scenes[0], kind] = calls.get((scenes[0], kind), -1) + 1
        turn = turns[scenes[0]][k] if k < len(turns[scenes[0]]) else past_the_end
        if kind == "reply":
            return f"Thinking:\n{turn['thinking']}\nResponse:\n{turn['content']}"
        planning = {key.lower(): value for key, value in turn["planning"].items()}  # under prompts.headers
        return "".join(f"{h}:\n{planning.get(h.lower(), '')}\n" for h in prompts.headers)
    return sim.Scripted(answer)


def replay_differences(records, transcripts):
    """A line per scenario whose replay differs from its published record, naming the first turn where they part."""
    for ours in transcripts:
        record = records[ours["profile_id"]]
        users = published_turns(record)[1]
        published = [(record["history"][0]["emotion-point"], None)] + [(u["emotion-point"], u["content"])
                                                                       for u in users]
        replayed = [(ours["initial_emotion"], None)] + [(t["emotion"], t["user"]) for t in ours["turns"]]
        if published == replayed and record["emo_point"] == ours["final_emotion"]:
            continue
        part = next((i for i in range(max(len(published), len(replayed)))
                     if published[i:i + 1] != replayed[i:i + 1]), None)
        where = (f"they part at turn {part}: published {published[part:part + 1] or 'nothing'}, replayed "
                 f"{replayed[part:part + 1] or 'nothing'}" if part is not None else
                 f"every turn agrees, but the record's emo_point {record['emo_point']} is not its last emotion-point")
        yield (f"  {ours['profile_id']}: published final {record['emo_point']} after {len(users)} turns, "
               f"replayed {ours['final_emotion']} after {len(ours['turns'])}; {where}"[:400])


def published_records(path, records):
    """read_system's records by id, each checked for the fields replay reads."""
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
    """Replay one published file, print its published row, ours and each scenario that differs. True: reproduced."""
    system = read_system(path)
    records = published_records(path, system["records"])
    played = [replace(p, prompts=prompts) for p in profiles if p.id in records]
    unknown = sorted(set(records) - {p.id for p in played})
    if unknown:
        raise BenchmarkError(f"{path}: scenario {unknown[0]} is not among the checkout's SAGE scenarios "
                             f"({len(unknown)} such): replay plays the scenarios of the checkout it is given")
    with tempfile.TemporaryDirectory() as out:   # eval's own output, read back; of its log only the warnings
        replayed = evaluate(replay_policy(played, records), None, played, replay_simulator(prompts, played, records),
                            out, protocol="sage", log=lambda line: line.lower().startswith("warning") and log(line))
        with open(os.path.join(out, "transcripts.jsonl"), encoding="utf-8") as f:
            transcripts = [json.loads(line) for line in f]
    differ = list(replay_differences(records, transcripts))
    log(path)
    for label, row in (("published", leaderboard_rows([system])[0]), ("replayed", replayed)):   # as SAGE prints them
        log(f"  {label:<9}  Score {round_half_up(row['score']):.1f}  Success {row['success']}  "
            f"Failure {row['failure']}  ({row['dialogues']} dialogues)")
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


def replay_flags(commands):
    rp = commands.add_parser("replay", help="play SAGE's published result files back through the eval loop (no LLM)")
    rp.add_argument("files", nargs="+", help="SAGE result files (SAGE/dataset/<simulator>_based_simulator/*.jsonl)")
    rp.add_argument("--official-prompts", required=True, metavar="DIR", help="your checkout of the authors' "
                    "digitalhuman repository (its root or SAGE/): the prompts and scenarios the files were played on")
    rp.set_defaults(func=replay_command)


# ----------------------------------------------------------------------------------------------------------
# 5. Hand-written SVG, all drawn by line_chart: eval trajectories, the leaderboard's means, rlver.py's curves.svg

OUTCOME_COLORS = {"success": "#1a9850", "failure": "#d73027", "max_turns": "#7b8794"}
COLORS = ["#2166ac", "#d73027", "#1a9850", "#762a83", "#e08214", "#35978f", "#7b8794", "#c51b7d"]
EMOTION_BOX = (64, 62, 630, 404)  # (left, top, right, bottom) of the emotion charts' plot area on a 900 x 460 page


def tick_label(value):
    """Whole numbers in full (20, 12345), others to 4 significant digits (0.25, 1.5e-05)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def nice_ticks(lo, hi, most=6, integer=False):
    """Round ticks inside [lo, hi]: the finest step of 1, 2 or 5 x 10^k giving at most `most` (integer: steps of
    at least 1). A zero-width range gets the one tick lo."""
    if hi <= lo:
        return [lo]
    magnitude = 10 ** math.floor(math.log10((hi - lo) / most))
    for step in (m * magnitude for m in (1, 2, 5, 10, 20)):   # 20 x magnitude always fits
        step = max(step, 1) if integer else step
        first = math.ceil(lo / step - 1e-9) * step
        count = int((hi - first) / step + 1e-9) + 1
        if count <= most:
            return [first + k * step for k in range(count)]


def line_chart(out, box, xlim, ylim, xticks, yticks, xlabel, ylabel="", lines=(), legend=()):
    """Append to `out` a chart in box = (left, top, right, bottom) pixels of the data ranges xlim and ylim (y up):
    grid, ticks, labels, one polyline per line = (class, colour, width, [(x, y)], hover text or None, opacity) and
    a legend = [(colour, width, text)] right of the box. Returns (x, y), the data -> pixel maps."""
    left, top, right, bottom = box

    def scale(lo, hi, a, b):  # data lo -> pixel a, hi -> b; a zero-width range maps to the middle
        return lambda v: (a + b) / 2 if hi == lo else a + (v - lo) * (b - a) / (hi - lo)
    x, y = scale(*xlim, left, right), scale(*ylim, bottom, top)
    for v in yticks:
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{right}" y2="{y(v):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{tick_label(v)}</text>')
    for v in xticks:
        out.append(f'<line x1="{x(v):.1f}" y1="{bottom}" x2="{x(v):.1f}" y2="{bottom + 5}" stroke="#333"/>')
        out.append(f'<text x="{x(v):.1f}" y="{bottom + 19}" text-anchor="middle">{tick_label(v)}</text>')
    out.append(f'<polyline points="{left},{top} {left},{bottom} {right},{bottom}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 36}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        middle = (top + bottom) / 2
        out.append(f'<text x="{left - 46}" y="{middle}" text-anchor="middle" '
                   f'transform="rotate(-90 {left - 46} {middle})">{escape(ylabel)}</text>')
    for cls, color, width, points, hover, opacity in lines:
        coords = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in points)
        out.append(f'<polyline class="{cls}" points="{coords}" fill="none" stroke="{color}" stroke-width="{width}" '
                   f'stroke-opacity="{opacity}">{f"<title>{escape(hover)}</title>" if hover else ""}</polyline>')
    for j, (color, width, text) in enumerate(legend):
        out.append(f'<line x1="{right + 56}" y1="{top + 14 + 22 * j}" x2="{right + 80}" y2="{top + 14 + 22 * j}" '
                   f'stroke="{color}" stroke-width="{width}"/>')
        out.append(f'<text x="{right + 86}" y="{top + 18 + 22 * j}">{escape(text)}</text>')
    return x, y


def write_page(path, width, height, title, subtitle, body, x=64):
    """The SVG document: a white page, the title and subtitle at x, then body. Written if path is set; returned."""
    text = "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
                      f'<rect width="{width}" height="{height}" fill="white"/>',
                      f'<text x="{x}" y="26" font-size="17" font-weight="bold">{escape(title)}</text>',
                      f'<text x="{x}" y="45" fill="#555">{escape(subtitle)}</text>', *body, "</svg>"]) + "\n"
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text


def mean_trajectory(trajectories):
    """Mean emotion per turn; a dialogue that ended keeps its final emotion, so the mean ends at the score."""
    longest = max(len(traj) for traj in trajectories)
    return [statistics.mean(traj[min(t, len(traj) - 1)] for traj in trajectories) for t in range(longest)]


def write_svg(path, trajectories, *, max_turns, title, labels, subtitle="", protocol="classic"):
    """trajectories.svg: a thin line per dialogue ([e_0, e_1, ...]) coloured by how it ended, the mean in bold."""
    outcomes = [sim.final_outcome(traj[-1], protocol) or "max_turns" for traj in trajectories]
    below = sim.protocol_of(protocol).failure_below
    words = {"success": "success (reached 100)", "failure": "failure (reached 0)" if below <= 1 else
             f"failure (ended below {below})", "max_turns": "ended otherwise"}
    legend = [(c, 1.5, f"{words[k]}: {outcomes.count(k)}") for k, c in OUTCOME_COLORS.items()]
    # (i % 5 - 2) / 4: identical dialogues drawn < 1 px apart, not hidden behind each other
    lines = [("dialogue", OUTCOME_COLORS[outcome], 1.5, [(t, e + (i % 5 - 2) / 4) for t, e in enumerate(traj)],
              f"{labels[i]}: final emotion {traj[-1]}", 0.55)
             for i, (traj, outcome) in enumerate(zip(trajectories, outcomes))]
    mean, out = mean_trajectory(trajectories), []
    x, y = line_chart(out, EMOTION_BOX, (0, max_turns), (0, 100), range(max_turns + 1), range(0, 101, 20), "turn",
                      "emotion (0 = leaves, 100 = fully supported)",
                      lines + [("mean", "#111", 3.5, list(enumerate(mean)), None, 1)],
                      legend + [("#111", 3.5, "mean (ended = final value)")])
    out.append(f'<text x="{x(len(mean) - 1) + 6}" y="{y(mean[-1]) - 6}" font-weight="bold">{mean[-1]:.1f}</text>')
    return write_page(path, 900, 460, title, subtitle, out)


def write_leaderboard_svg(path, systems):
    """One line per system: its mean emotion per turn (x: user turn, 0 = the opening's emotion)."""
    means = [mean_trajectory([traj for _, _, traj, _ in s["dialogues"]]) for s in systems]
    settings = sorted({f"{s['provenance']['protocol']} protocol, simulator {s['provenance']['simulator']}"
                       for s in systems})
    legend = [(COLORS[j % len(COLORS)], 2.5, s["name"]) for j, s in enumerate(systems)]
    lines = [("system", color, 2.5, list(enumerate(mean)), name, 1) for mean, (color, _, name) in zip(means, legend)]
    last_turn, out = max(1, max(len(m) for m in means) - 1), []
    line_chart(out, EMOTION_BOX, (0, last_turn), (0, 100), range(last_turn + 1), range(0, 101, 20), "user turn",
               "mean emotion", lines, legend)
    return write_page(path, 900, 460, f"mean emotion per turn ({'; '.join(settings)})", f"{len(systems)} systems", out)


# (metrics key, panel title, the y range always shown or None for the data's own, colour)
CURVE_SERIES = [("reward", "mean reward", (0, 1), "#2166ac"),
                ("success", "success rate (emotion 100)", (0, 1), "#1a9850"),
                ("failure", "failure rate (emotion 0)", (0, 1), "#d73027"),
                ("eval_score", "eval score (mean final emotion)", (0, 100), "#762a83"),
                ("kl_ref", "KL to the reference policy", None, "#e08214"),
                ("entropy", "policy entropy", None, "#35978f"),
                ("policy_tokens", "policy tokens per step", None, "#7b8794")]
# CURVE_COLUMNS columns of PANEL_W x PANEL_H panels from (CURVE_LEFT, CURVE_TOP); plot area x+60..x+420, y+30..y+190
CURVE_COLUMNS, PANEL_W, PANEL_H, CURVE_LEFT, CURVE_TOP = 2, 450, 240, 30, 70


def run_rows(out):
    """A training run's metrics.jsonl rows, each with its evaluation's score (eval/step_N/summary.json) if any."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        summary = os.path.join(out, "eval", f"step_{row['step']}", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as g:
                row["eval_score"] = json.load(g)["score"]
    return rows


def write_curves(path, rows, title="training curves"):
    """A panel per CURVE_SERIES key in `rows` (metrics.jsonl's dicts), value against step, all on one x range; the
    last value in the title and as a dot. Returns the SVG text (written if path is set)."""
    steps = [row["step"] for row in rows if finite(row.get("step"))]
    xlim, out, panels = (min(steps), max(steps)) if steps else (0, 1), [], 0
    for key, name, fixed, color in CURVE_SERIES:
        points = sorted((r["step"], r[key]) for r in rows if finite(r.get("step")) and finite(r.get(key)))
        if not points:
            continue
        px, py = CURVE_LEFT + panels % CURVE_COLUMNS * PANEL_W, CURVE_TOP + panels // CURVE_COLUMNS * PANEL_H
        panels += 1
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        pad = 0 if fixed or lo < hi else abs(lo) * 0.1 or 1.0  # a constant series sits mid-panel
        ylim = (min(fixed[0], lo), max(fixed[1], hi)) if fixed else (lo - pad, hi + pad)
        out.append(f'<g class="panel" data-series="{key}">')
        out.append(f'<text x="{px + 60}" y="{py + 18}" font-weight="bold">{escape(name)}: last '
                   f'{tick_label(points[-1][1])} at step {tick_label(points[-1][0])}</text>')
        x, y = line_chart(out, (px + 60, py + 30, px + 420, py + 190), xlim, ylim, nice_ticks(*xlim, integer=True),
                          nice_ticks(*ylim), "step", lines=[("series", color, 2, points, None, 1)])
        out += [f'<circle cx="{x(points[-1][0]):.1f}" cy="{y(points[-1][1]):.1f}" r="3" fill="{color}"/>', "</g>"]
    subtitle = (f"{len(steps)} metrics rows, steps {tick_label(min(steps))}..{tick_label(max(steps))}" if steps
                else "no metrics rows with a step yet")
    height = CURVE_TOP + math.ceil(max(1, panels) / CURVE_COLUMNS) * PANEL_H
    return write_page(path, CURVE_LEFT * 2 + CURVE_COLUMNS * PANEL_W, height, title, subtitle, out, x=CURVE_LEFT)


# ----------------------------------------------------------------------------------------------------------
# 6. Speed and rollout benchmarks; their heavy imports (transformers, http.server) stay inside the functions.


def run_times(fn, device, warmup, repeats):
    """Wall times of `repeats` runs of fn() after `warmup` untimed ones, and the last output."""
    times, sync = [], (torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    for _ in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return times[warmup:], result


def spread(values, digits=3):
    return "/".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def speed(args, log=print):
    """Greedy tokens/s of model.generate (eager; compiled with --compile) against transformers' generate on the
    same checkpoint and prompts, then one training step's time."""
    import transformers

    device, B, P, N = torch.device(args.device), args.batch, args.prompt_len, args.new_tokens
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda but torch sees no CUDA device: use --device cpu")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        path = args.model or make_tiny_checkpoint(tmp, hidden_size=args.hidden, num_layers=args.layers,
                                                  intermediate_size=768)
        read_config(path)  # one-line error for a bad --model before anything heavy
        model = load_model(path, device=device, dtype=DTYPES[args.dtype])
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).to(device).eval()
    hf_model.generation_config.eos_token_id = None  # never stop early: every row makes exactly N tokens
    prompt_ids = torch.randint(0, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(0))
    prompts, prompt_ids = prompt_ids.tolist(), prompt_ids.to(device)  # (B, P), equal lengths: no padding
    log(f"speed: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params (hidden {model.config.hidden_size}, "
        f"{model.config.num_hidden_layers} layers), batch {B}, prompt {P} + {N} new tokens, greedy, {device.type} "
        f"{args.dtype}, {torch.get_num_threads()} threads, {args.repeats} timed runs after 1 warm-up")
    runs = {"model.py generate": lambda: generate(model, prompts, N, eos_ids=[-1], temperature=0)[0],  # -1: no EOS
            "model.py + compile": lambda: generate(model, prompts, N, eos_ids=[-1], temperature=0, compile=True)[0],
            "transformers generate": lambda: hf_model.generate(
                input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=N, min_new_tokens=N,
                do_sample=False, pad_token_id=0)[:, P:].tolist()}
    with torch.no_grad():
        results = {name: run_times(fn, device, 1, args.repeats) for name, fn in runs.items()
                   if args.compile or name != "model.py + compile"}
    base_ids, hf_seconds = results["model.py generate"][1], statistics.median(results["transformers generate"][0])
    log(f"{'generation':<22} {'seconds':>8} {'tokens/s min/median/max':>26} {'vs transformers':>16} "
        f"{'same tokens':>12}")
    for name, (times, ids) in results.items():
        same = sum(a == b for row, base in zip(ids, base_ids) for a, b in zip(row, base)) / (B * N)
        log(f"{name:<22} {statistics.median(times):>8.3f} {spread([B * N / t for t in times], 1):>26} "
            f"{hf_seconds / statistics.median(times):>15.2f}x {same:>12.1%}")
    log("(vs transformers = tokens/s / transformers' tokens/s in this run; same tokens = share of greedy tokens equal "
        "to model.py's; with --compile the untimed warm-up call compiles)")
    del hf_model, runs, results  # free transformers' memory before the gradients and AdamW state
    train_step_speed(args, model, log)


def train_step_speed(args, model, log):
    """One step of loss = -mean(advantage * log p(sampled token)), the REINFORCE core of PPO/GRPO, on random tokens
    as rlver trains: fp32 master weights, --dtype compute by autocast, AdamW."""
    device, (B, P), T = model.inv_freq.device, (args.batch, args.prompt_len), args.prompt_len + args.new_tokens
    model.float()
    model.autocast_dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(device)  # (B, T)
    advantages = torch.randn(B, 1, generator=g).to(device)  # (B, 1), one per sequence
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        (-(advantages * token_logprobs(model, ids)[:, P - 1:]).mean()).backward()  # over the "sampled" tokens
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    times, _ = run_times(step, device, 1, args.repeats)
    log(f"training step (token_logprobs + policy-gradient loss + AdamW, {args.dtype} compute), batch {B} x {T} "
        f"tokens: {spread(times)} s (min/median/max)")


def serve_simulator(latency_s, port_queue):
    """In its own process (not competing for the rollout's GIL): an OpenAI-compatible endpoint on 127.0.0.1 whose port
    goes on port_queue, answering after latency_s with a change from the request's length, in the simulator's format."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # /v1/chat/completions
            messages = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"]
            time.sleep(latency_s)
            content = sim.format_simulator_output("(a stand-in)", len(messages[-1]["content"]) % 9 - 4, "I see. Go on.")
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128  # (the default backlog of 5 drops simultaneous connects: 1 s SYN retries)

    server = Server(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever(poll_interval=0.05)


ENGINE_VARIANTS = {"engine": (True, True), "no-overlap": (True, False), "no-kv-reuse": (False, True),
                   "lockstep re-prefill": (False, False)}  # name -> rollout.rollout's (kv_reuse, overlap)


def rollout_variants(model, tokenizer, profiles, backend, args, latency, log):
    seeds, rows = [ro.rollout_seed(0, 0, j) for j in range(len(profiles))], []
    for name, (kv_reuse, overlap) in ENGINE_VARIANTS.items():
        times = []
        for _ in range(args.repeats):
            timing, t0 = {}, time.time()
            dialogues = ro.rollout(model, tokenizer, profiles, backend, seeds=seeds, think=False,
                                   max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                                   timing=timing, kv_reuse=kv_reuse, overlap=overlap)
            times.append(time.time() - t0)
        rows.append((name, times, timing, [d.ids for d in dialogues]))
    for name, times, t, ids in rows:  # vs lockstep = rows[-1]'s median wall time / this one's; rows[0]: the engine
        log(f"{latency:>9.0f}ms {name:<20} {spread(times, 2):>22}  "
            f"{t['prefill_tokens'] / t['conversation_tokens']:>12.2f} {t['decode_steps']:>12} "
            f"{t['active_rows'] / max(t['decode_steps'], 1):>9.1f} {t['simulator']:>10.2f} "
            f"{statistics.median(rows[-1][1]) / statistics.median(times):>10.2f}x "
            f"{'yes' if ids == rows[0][3] else 'NO':>8}")


def rollout_bench(args, log=print):
    """rollout.rollout against its ablations at each simulator latency, on a model whose replies vary in length."""
    import multiprocessing

    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_tiny_checkpoint(tmp, hidden_size=args.hidden, num_layers=args.layers)
        read_config(path)
        model, tokenizer = load_model(path), load_tokenizer(path)
    # A random model almost never samples EOS: +eos_bias on its logit gives replies of varied length (geometric)
    model.lm_head.register_forward_hook(lambda m, i, logits: logits.index_add(
        -1, torch.tensor([tokenizer.eos_token_id]), torch.full((*logits.shape[:-1], 1), args.eos_bias)))
    profiles = [p for p in sim.builtin_profiles("train")[:args.profiles] for _ in range(args.group_size)]
    log(f"rollout: {len(profiles)} dialogues ({args.profiles} profiles x group {args.group_size}), "
        f"{args.max_turns} turns x <= {args.max_new_tokens} tokens, hidden {model.config.hidden_size} x "
        f"{model.config.num_hidden_layers} layers, {torch.get_num_threads()} threads, {args.repeats} repeats")
    log(f"{'sim latency':>11} {'variant':<20} {'wall s (min/med/max)':>22} {'prefill/conv':>12} {'decode steps':>12} "
        f"{'rows/step':>9} {'sim wait s':>10} {'vs lockstep':>11} {'same ids':>8}")
    ctx = multiprocessing.get_context("spawn")
    for latency in args.latencies_ms:
        port_queue = ctx.Queue()
        server = ctx.Process(target=serve_simulator, args=(latency / 1000, port_queue), daemon=True)
        server.start()
        backend = sim.OpenAIBackend(f"http://127.0.0.1:{port_queue.get(timeout=60)}/v1", model="rules",
                                    concurrency=len(profiles))
        try:
            rollout_variants(model, tokenizer, profiles, backend, args, latency, log)
        finally:
            server.terminate()
            server.join()
    log("(prefill/conv = tokens prefilled / tokens in the finished dialogues; vs lockstep = median wall time of "
        "'lockstep re-prefill' / this one's; same ids = every token equals the engine's; the last run's counters)")


def benchmark_flags(commands):
    """speed and rollout: the flags both have (the model, repeats, threads), then each one's own."""
    s = commands.add_parser("speed", help="generation tokens/s against transformers, a training step",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = commands.add_parser("rollout", help="the rollout engine against its ablations at simulator latencies",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for p, func in ((s, speed), (r, rollout_bench)):
        p.add_argument("--model", default=None, help="local HF model folder; default: a fresh random checkpoint")
        p.add_argument("--hidden", type=POSITIVE, default=256, help="hidden size of the fresh checkpoint")
        p.add_argument("--layers", type=POSITIVE, default=4, help="layers of the fresh checkpoint")
        p.add_argument("--repeats", type=POSITIVE, default=3, help="timed runs (min/median/max)")
        p.add_argument("--threads", type=COUNT, default=0, help="torch.set_num_threads (0: torch's default)")
        p.set_defaults(func=func)
    for flag, default in (("--batch", 8), ("--prompt-len", 32), ("--new-tokens", 128)):
        s.add_argument(flag, type=POSITIVE, default=default)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--dtype", choices=list(DTYPES), default="float32")
    s.add_argument("--compile", action="store_true", help="also time model.generate(compile=True)")
    for flag, default in (("--profiles", 4), ("--group-size", 4), ("--max-turns", 8), ("--max-new-tokens", 64)):
        r.add_argument(flag, type=POSITIVE, default=default)
    r.add_argument("--eos-bias", type=float, default=3.5, help="added to the EOS logit: replies of varied length")
    r.add_argument("--latencies-ms", default="0,50,200", help="simulator answer delays to measure",
                   type=comma_list(float, "give comma-separated milliseconds, e.g. 0,50,200"))


# ----------------------------------------------------------------------------------------------------------
# 7. Command line


def main(argv=None):
    p = sim.Parser(description="RLVER evaluation (SAGE-style), leaderboard, replay, speed and rollout benchmarks.")
    commands = p.add_subparsers(dest="command", required=True)
    for flags in (eval_flags, leaderboard_flags, replay_flags, benchmark_flags):
        flags(commands)
    args = p.parse_args(argv)
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
