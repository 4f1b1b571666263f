"""The simulated user of RLVER (arXiv 2507.03112), SAGE's "sentient agent" (arXiv 2505.02847), built from a profile:
it carries an emotion in [0, 100]; after every agent reply it (i) reasons how the reply changes its emotion, (ii) says
how it feels now, (iii) decides how to answer, and writes an integer change and its reply. The CODE applies the
change, emotion <- clamp(emotion + change, 0, 100), under a PROTOCOL; the reward, final emotion / 100, is
"verifiable": arithmetic over the parsed output. Sections: 1 profiles; 2 protocols and the rules they drive,
episodes; 3 prompts (3b: the authors'); 4 parsers; 5 the turn loop; 6 backends; 7 the shared flags.

Every backend has `submit(request) -> concurrent.futures.Future[str]` and owns its threads (section 6); all answer in
one format, so one parser serves LLM simulators and the rules backend alike."""
import argparse
import ast
import concurrent.futures
import contextlib
import datetime
import email.utils
import functools
import hashlib
import http.client
import json
import math
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
MODES = ("vanilla", "challenging")   # the forgiving and the demanding environment (paper: moderate trains best)
MAX_ABS_CHANGE = 30                  # classic's clamp on a change, [-30, 30] (its parser and templates say so)
FALLBACK_REPLY = {"en": "Sorry, I lost my train of thought. What were you saying?", "zh": "抱歉，我刚才走神了。你刚才说什么？"}
FALLBACK_OPENING = {"en": "I've had a rough few weeks and I need to talk to someone.", "zh": "最近心里有点堵，想找个人说说。"}
EMPTY_REPLY = "(the supporter sent an empty message)"  # shown to the simulator for an empty agent reply


class ProfileError(ValueError):
    """A profile file the user pointed us at is missing or malformed."""


class SimulatorError(RuntimeError):
    """A simulator backend is unusable (unreachable endpoint, rejected key, wrong answer count)."""


class ParseError(ValueError):
    """A simulator output does not follow the strict format its request asked for (see the parsers below)."""


# ----------------------------------------------------------------------------------------------------
# 1. Profiles

@dataclass
class Profile:
    id: str
    persona: str            # who the user is: name, age, job, temperament, speaking style
    scenario: str           # the background story that brought them here
    hidden_intention: str   # what they truly need; the agent never sees it, the simulator never says it
    opening: str            # the user's first message; "" = the simulator writes one (prepare_profiles)
    initial_emotion: int = None   # None = the protocol's start
    traits: list = field(default_factory=list)   # personality words, e.g. ["avoidant", "guarded"]
    lang: str = None        # "en" / "zh": which templates the simulator and the policy get (None: detect_lang)
    protocol: str = "classic"   # the dialogue rules this user plays by (PROTOCOLS); the one default protocol
    opening_written: bool = False   # True: the simulator wrote the opening (the profile had none)
    prompts: "OfficialPrompts" = None   # the authors' prompts (section 3b); None: ours


# (our field, its keys by preference): our layout, and the public RLVER/SAGE one (main_cha + cha_group: traits)
OUR_KEYS = [("persona", ("persona",)), ("scenario", ("scenario", "background")),
            ("hidden_intention", ("hidden_intention",)), ("opening", ("opening", "topic"))]
PUBLIC_KEYS = [("persona", ("player",)), ("scenario", ("scene",)), ("hidden_intention", ("task",)),
               ("opening", ("first_talk",))]


def _profile_from_record(record, where, default_id):   # one JSON object -> Profile; `where`: file:line
    if not isinstance(record, dict):
        raise ProfileError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    for key, value in record.items():  # JSON may escape a lone surrogate (\ud800), which no UTF-8 text can hold
        if re.search("[\ud800-\udfff]", json.dumps(value, ensure_ascii=False)):
            raise ProfileError(f"{where}: field '{key}' holds invalid Unicode (a lone surrogate): fix it in the file")
    public = "player" in record or "first_talk" in record   # the public layout is recognised by its keys
    table = PUBLIC_KEYS if public else OUR_KEYS
    key_of = {name: next((k for k in keys if k in record), None) for name, keys in table}
    missing = [" or ".join(keys) for name, keys in table if key_of[name] is None and not (public and name == "opening")]
    if missing:
        raise ProfileError(f"{where}: profile is missing key(s) {', '.join(missing)} "
                           f"({'public RLVER' if public else 'rlver'} layout; expected {[k[0] for _, k in table]})")
    for key in filter(None, key_of.values()):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ProfileError(f"{where}: '{key}' must be a non-empty string")
    fields = {name: record[key].strip() if key else "" for name, key in key_of.items()}   # "": the simulator writes it
    emotion = record.get("initial_emotion")   # absent: the protocol's start
    emotion = int(emotion) if isinstance(emotion, float) and emotion.is_integer() else emotion   # 50.0 is 50
    if emotion is not None and (isinstance(emotion, bool) or not isinstance(emotion, int) or not 1 <= emotion <= 99):
        raise ProfileError(f"{where}: initial_emotion must be an integer in 1..99, got {emotion!r}")
    traits = [record["main_cha"]] if public and record.get("main_cha") else []
    group = record.get("cha_group" if public else "traits") or []
    traits += group if isinstance(group, list) else [group]
    return Profile(id=str(record.get("id", default_id)), initial_emotion=emotion, traits=[str(t) for t in traits],
                   **fields)


def load_profiles(path):   # a JSONL file -> Profiles, one a line (blank lines skipped)
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text (byte {e.start}): re-save the file as UTF-8") from None
    found = {}   # profile id -> (the line that defined it, the profile)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        profile = _profile_from_record(record, f"{path}:{lineno}", default_id=f"{path.stem}-{lineno}")
        if profile.id in found:   # ids key the eval table, transcripts and the leaderboard
            raise ProfileError(f"{path}: lines {found[profile.id][0]} and {lineno} both have profile id "
                               f"{profile.id!r}: give every profile its own id")
        found[profile.id] = lineno, profile
    if not found:
        raise ProfileError(f"{path}: no profiles in file")
    return [profile for _, profile in found.values()]


def builtin_profiles(split="train"):   # our English profile sets: 'train' (105 profiles), 'test' (32)
    if split not in ("train", "test"):
        raise ValueError(f"unknown profile split {split!r}: use 'train' or 'test'")
    return load_profiles(PROMPTS_DIR / f"profiles_{split}.jsonl")


# ----------------------------------------------------------------------------------------------------
# 2. Protocols (PROTOCOLS: each the whole rule set of one dialogue game) and episodes. Emotion is capped at 100
# and floored at 0 in all: RLVER floors its reward at 0, SAGE stops below 10 with changes of at most 10.

@dataclass(frozen=True)
class Protocol:
    initial_emotion: int   # start for a profile without its own initial_emotion
    max_change: int        # a change is clamped to [-max_change, max_change]; None: no clamp
    success_at: int        # a final emotion >= success_at counts as "success" (SAGE's Success)
    failure_below: int     # a final emotion < failure_below counts as "failure" and ends the dialogue
    goodbye: tuple         # substrings of the user's reply that end it ("goodbye"), checked first
    max_turns: int         # scored policy replies by default (a turn = one policy reply + its evaluation)
    stages: int            # 1: one call writes thought + change + reply; 2: analysis -> change, then reply
    ends_at_success: bool = True   # reaching success_at ends the dialogue


# rlver: RLVER's training simulator (hard_player_simulator_dsv3.py), whose max_turns=8 counts the rounds after
# the first; sage: SAGE's test_npc.py loop, whose 10th agent reply is never shown to the simulator
PROTOCOLS = {"classic": Protocol(50, MAX_ABS_CHANGE, 100, 1, (), 8, 1),   # ours
             "rlver": Protocol(30, None, 100, 1, ("再见", "拜拜"), 9, 2, ends_at_success=False),
             "sage": Protocol(40, 10, 100, 10, ("再见", "拜拜"), 9, 2)}


def protocol_of(name):
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def final_outcome(emotion, protocol):   # "failure", "success" or None, from the final emotion alone
    P = protocol_of(protocol)
    return "failure" if emotion < P.failure_below else "success" if emotion >= P.success_at else None


def dialogue_end(emotion, turns, max_turns, user_text, protocol):
    """Why a dialogue ends now (None: not yet), in SAGE's order (test_npc.py): goodbye, failure, success, max_turns."""
    if any(word in (user_text or "") for word in protocol_of(protocol).goodbye):
        return "goodbye"
    outcome = final_outcome(emotion, protocol)
    if outcome == "failure" or (outcome == "success" and protocol_of(protocol).ends_at_success):
        return outcome
    return "max_turns" if turns >= max_turns else None


def detect_lang(profile):   # 'zh' when the profile is mostly Chinese (the public RLVER/SAGE data), else 'en'
    text = profile.persona + profile.scenario + profile.hidden_intention + profile.opening
    cjk = sum("\u3400" <= ch <= "\u9fff" for ch in text)
    letters = sum(ch.isascii() and ch.isalpha() for ch in text)
    return "zh" if cjk > letters / 4 else "en"


def band(emotion):   # SAGE's coarse emotion band, what the reply stage sees instead of the number
    return next(b for b, low in (("S", 100), ("A", 70), ("B", 40), ("C", 10), ("F", -10**9)) if emotion >= low)


@dataclass
class Episode:
    profile: Profile
    emotion: int              # current emotion in [0, 100]
    messages: list            # the dialogue from the AGENT's point of view (user/assistant roles, no system)
    turns: list               # per turn: {turn, agent, thought, change, emotion, user, parse_failed}
    done: bool = False
    end_reason: str = None    # dialogue_end's reason, or "thought_cut" / "max_context"
    parse_failures: int = 0   # turns whose simulator output stayed unparseable after the retries
    truncated_replies: int = 0   # policy replies cut at the max-new-tokens cap (set by rollout.rollout)
    cut_thoughts: int = 0     # 1 when the policy's reply ended inside its <think> (the dialogue ended there)
    changes_out_of_range: int = 0   # unclamped changes (rlver) outside -100..100: the simulator misread its scale


def reward(episode):   # RLVER's verifiable reward: final emotion / 100, in [0, 1] (the emotion is floored at 0)
    return episode.emotion / 100


def trajectory(episode):   # emotion before the first reply and after every turn: [e_0, e_1, ..., e_final]
    return [episode.profile.initial_emotion] + [turn["emotion"] for turn in episode.turns]


def resolve_profile(profile, protocol=None, lang=None, initial_emotion=None):   # as played: protocol, lang, start
    protocol = protocol or profile.protocol
    start = next(e for e in (profile.initial_emotion, initial_emotion, protocol_of(protocol).initial_emotion)
                 if e is not None)
    return replace(profile, protocol=protocol, lang=lang or profile.lang or detect_lang(profile),
                   initial_emotion=start)


def new_episode(profile):
    if not profile.opening:
        raise ValueError(f"profile {profile.id} has no opening line: run simulator.prepare_profiles first")
    profile = resolve_profile(profile)
    return Episode(profile=profile, emotion=profile.initial_emotion,
                   messages=[{"role": "user", "content": profile.opening}], turns=[])


def prepare_profiles(profiles, backend=None, *, protocol=None, mode="vanilla", lang=None,
                     initial_emotion=None, retries=2, log=print):
    """The profiles as played; one without an opening gets it from the simulator (as RLVER's trainer) or a fallback."""
    played = [resolve_profile(p, protocol, lang, initial_emotion) for p in profiles]
    todo = [i for i, p in enumerate(played) if not p.opening]   # (backend None: every profile has its opening)
    asks = [ask(_request(Episode(played[i], played[i].initial_emotion, [], []), "", mode, "opening"),
                parse_official_reply if played[i].prompts else parse_reply_output, retries) for i in todo]
    for i, (opening, error) in zip(todo, play_turns(backend, asks, log=log)):
        if opening is None:
            log(f"WARNING: the simulator could not write an opening for profile {played[i].id} "
                f"({error}); using a fallback line")
        played[i] = replace(played[i], opening=opening or FALLBACK_OPENING[played[i].lang], opening_written=True)
    return played


def visible_reply(text):   # what the user sees: the text after the last </think>; nothing if a <think> never closed
    text = (text or "").strip()
    return "" if "<think>" in text and "</think>" not in text else text.rsplit("</think>", 1)[-1].strip()


COUNT_WARNINGS = {   # the per-episode counts worth a warning -> what it means
    "truncated_replies": "policy replies were cut at --max-new-tokens (raise it: the user read a cut reply)",
    "cut_thoughts": "dialogues ended because a --think reply was cut before </think> (raise --max-new-tokens)",
    "changes_out_of_range": "simulator changes were outside -100..100 (applied unclamped, as RLVER's trainer does): "
                            "the simulator misreads its scale"}
COUNTS = tuple(COUNT_WARNINGS)


def count_warnings(counts, where):   # warning lines for the COUNTS totals of a batch
    return [f"warning: {where}: {counts[k]:g} {COUNT_WARNINGS[k]}" for k in COUNTS if counts.get(k)]


def check_parse_health(episodes, max_rate, where, warn=None, sum_ranks=lambda n: n):
    """Unparseable turns (scored 0): a warning, SimulatorError past max_rate; sum_ranks sums over ranks."""
    bad = [t["thought"] for ep in episodes for t in ep.turns if t.get("parse_failed")]
    failed, total = sum_ranks(len(bad)), sum_ranks(sum(len(ep.turns) for ep in episodes))
    if bad and warn:
        warn(f"warning: {where}: {failed}/{total} simulator turns were unparseable (scored change 0, the policy "
             f"saw a fallback user line); e.g. {bad[0][:300]}")
    if failed > max_rate * total:
        raise SimulatorError(f"{where}: {failed}/{total} simulator turns were unparseable (more than --max-parse-"
                             f"failure-rate {max_rate:g}): no score or update can rest on it; fix its model or prompt")
    return failed, total


def transcript(episode, **extra):   # one JSON record per dialogue, enough to re-score it; extra: step=, seed=
    return {**extra, "profile_id": episode.profile.id, "initial_emotion": episode.profile.initial_emotion,
            "final_emotion": episode.emotion, "reward": reward(episode), "end_reason": episode.end_reason,
            "protocol": episode.profile.protocol, "lang": episode.profile.lang,
            "opening": episode.profile.opening, "opening_written": episode.profile.opening_written,
            "parse_failures": episode.parse_failures, **{k: getattr(episode, k) for k in COUNTS},
            "turns": [{k: t[k] for k in ("turn", "agent", "emotion", "change", "thought", "user")}
                      for t in episode.turns]}


# ----------------------------------------------------------------------------------------------------
# 3. Prompts: [system: who you are + rules + format, user: the dialogue], or the authors' (section 3b)

@functools.cache
def load_prompt(name, lang="en"):   # prompts/<name>, or its <stem>_zh.txt for 'zh'
    return (PROMPTS_DIR / (name[:-len(".txt")] + "_zh.txt" if lang == "zh" else name)).read_text(encoding="utf-8")


def _fill(template, values, brace=("{", "}")):   # str.replace per placeholder (profile text may hold braces)
    for name, value in values:
        template = template.replace(brace[0] + name + brace[1], str(value))
    return template


def _messages(episode):   # the dialogue so far as (role, text)
    turns = [message for t in episode.turns for message in (("assistant", t["agent"]), ("user", t["user"]))]
    return [("user", episode.profile.opening)] + turns


def _dialogue(episode):   # the dialogue so far from the user's side, one "Speaker: text" line per message
    me, other = {"en": ("You", "Supporter"), "zh": ("你", "倾诉对象")}[episode.profile.lang]
    return "\n".join(f"{me}: {text}" if role == "user" else f"{other}: {text or EMPTY_REPLY}"
                     for role, text in _messages(episode))


def _our_request(profile, mode, step, **values):   # [system: mode template + profile, user: simulator_<step>.txt]
    if mode not in MODES:
        raise ValueError(f"unknown simulator mode {mode!r}: use one of {', '.join(MODES)}")
    system = _fill(load_prompt(f"simulator_{mode}.txt", profile.lang), [
        ("persona", profile.persona), ("scenario", profile.scenario),
        ("traits", ", ".join(profile.traits) or "(not specified)"), ("hidden_intention", profile.hidden_intention)])
    if step != "turn":   # (the one-call format is the turn's alone)
        for header in ("## Output format", "## 输出格式"):   # where a mode template's one-call format section starts
            system = system.split(header)[0].rstrip() + "\n"
    return [{"role": "system", "content": system},
            {"role": "user", "content": _fill(load_prompt(f"simulator_{step}.txt", profile.lang), values.items())}]


def build_request(episode, agent_reply, mode="vanilla", step="turn", analysis="", change=0):
    """A turn's messages: step 'turn' the one-call protocol, 'analysis' the two-stage call 1 (thought and change),
    'reply' call 2 (from the analysis and `change`: shown the band of the emotion after it, not the number); or
    'opening', the user's first line (of an episode with no opening yet), at the start emotion's band."""
    profile, p = episode.profile, episode.profile.prompts
    after = band(apply_change(episode.emotion, change, profile.protocol)[1])   # the reply's: the band after it
    if p:   # the authors': SAGE's analysis sees the whole dialogue, RLVER's all but the last two messages, then those
        earlier, last_two, whole = _official_history(episode, agent_reply)
        if step == "opening":   # their reply template, with their opening planning line and history text
            analysis, earlier, last_two = p.opening_planning, p.opening_history, ""
        if step in ("reply", "opening"):
            return _official_request(profile, p.reply, [("planning", analysis), ("emotion", f"Emotion-{after}")],
                                     earlier, last_two)
        start = profile.initial_emotion if p.start_emotion_quirk else episode.emotion
        return _official_request(profile, p.analysis, [("emotion", start)],
                                 *([whole] if p.source == "SAGE" else [earlier, last_two]))
    values = dict(analysis=analysis, band=after) if step in ("reply", "opening") else dict(emotion=episode.emotion)
    return _our_request(profile, mode, step, dialogue=_dialogue(episode), agent_reply=agent_reply or EMPTY_REPLY,
                        **values)


# ----------------------------------------------------------------------------------------------------
# 3b. The authors' prompts, read at run time from the user's checkout (none of their text is here), filled and parsed
# as their code does: target_prompt, the analysis (planning_reply) and reply (player_reply) templates. Against the
# paper: RLVER's analysis sees the start emotion 30 (ours the live one unless --official-quirks); SAGE reads a
# `target` its profiles lack (we send it).

RLVER_ROLLOUT = "RLVER/code/verl/workers/rollout/vllm_rollout/"   # the files below, under the checkout root
OFFICIAL_SIMULATOR = {"sage": "SAGE/simulator_response.py", "rlver": RLVER_ROLLOUT + "hard_player_simulator_dsv3.py"}
OFFICIAL_POLICY = {"sage": ("SAGE/npc_response.py", "role_system"),   # (file, variable); think: --think
                   "rlver": (RLVER_ROLLOUT + "system_prompt.py", "system_prompt_train_unthink"),
                   "think": (RLVER_ROLLOUT + "system_prompt.py", "system_prompt_train_think")}
OFFICIAL_ROLES = {"user": "你", "assistant": "NPC"}   # the speakers in their JSON history
# read of a file that does not parse: templates, targets, {{planning}} / {{dialog_history}}, the opening line
_STATEMENTS = re.compile(r'^[ \t]*((?:template|role_system|system_prompt_train_\w+) = (?P<q>"""|\'\'\').*?(?P=q)'
                         r'|target_prompt = \{.*?^[ \t]*\}[ \t]*$'
                         r'|\S[^\n]*\.replace\("\{\{(?:planning|dialog_history)\}\}"[^\n]*'
                         r'|planning\[.analyse.\] = [^\n]*)', re.MULTILINE | re.DOTALL)


@dataclass
class OfficialPrompts:
    source: str              # "SAGE" or "RLVER": whose simulator prompts
    target: str              # the purpose-of-the-talk text ({{target}})
    analysis: str            # the analysis call's template
    reply: str               # the reply call's template
    headers: tuple           # the analysis sections in order, as its output format lists them; Change last
    planning: list           # how {{planning}} is built: [("text", s) | ("section", key)], from their code
    opening_planning: str    # {{planning}} of the opening request
    opening_history: str     # {{dialog_history}} of the opening request
    policy: str              # the policy's system prompt
    policy_source: str       # "file:variable" it came from
    files: dict              # every file read -> its sha256 (provenance)
    start_emotion_quirk: bool = False   # --official-quirks: RLVER's analysis sees the start emotion


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_python(path):
    """{name, or key of planning['analyse']: [literal values]}, {.replace placeholder: [argument nodes]}, in order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"--official-prompts: cannot read {path} ({e.__class__.__name__}): point "
                           f"--official-prompts at a checkout of the authors' repository") from None
    try:
        trees = [ast.parse(text)]
    except SyntaxError:   # (RLVER's simulator file): the statements _STATEMENTS finds, one by one
        trees = []
        for m in _STATEMENTS.finditer(text):
            with contextlib.suppress(SyntaxError):
                trees.append(ast.increment_lineno(ast.parse(m.group(1)), text.count("\n", 0, m.start(1))))
    assigned, replaced = {}, {}
    for n in sorted((n for tree in trees for n in ast.walk(tree) if hasattr(n, "lineno")),
                    key=lambda n: (n.lineno, n.col_offset)):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                name = t.id if isinstance(t, ast.Name) else getattr(getattr(t, "slice", None), "value", None)
                with contextlib.suppress(ValueError, TypeError, RecursionError):   # not a literal (a .split(...))
                    assigned.setdefault(name, []).append(ast.literal_eval(n.value))
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "replace" and len(n.args) == 2:
            replaced.setdefault(getattr(n.args[0], "value", None), []).append(n.args[1])
    return assigned, replaced


def _terms(node, path):   # their "..." + planning['key'] -> [("text", s) | ("section", key)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _terms(node.left, path) + _terms(node.right, path)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [("text", node.value)]
    if isinstance(node, ast.Subscript) and isinstance(getattr(node.slice, "value", None), str):
        return [("section", node.slice.value)]
    raise ProfileError(f"--official-prompts: {path}: unexpected term in the {{{{planning}}}} expression "
                       f"({ast.dump(node)[:80]})")


def _check(ok, path, problem):
    if not ok:
        raise ProfileError(f"--official-prompts: {path}: {problem}: this checkout differs from the layout rlver "
                           f"reads (README, 'Official prompts'); use an unmodified checkout")


def _first(values, path, what, kind=str):
    values = [v for v in values if isinstance(v, kind)]
    _check(values, path, f"has no {what}")
    return values[0]


def official_root(path):   # the checkout root: DIR, or the parent of a SAGE/ or RLVER/ DIR
    path = Path(path).resolve()
    if not path.is_dir():
        raise ProfileError(f"--official-prompts {path}: not a folder; give your checkout of the authors' "
                           f"digitalhuman repository (or its SAGE/ or RLVER/ folder)")
    return path.parent if path.name in ("SAGE", "RLVER") else path


def _simulator_prompts(path):   # their simulator file -> the OfficialPrompts fields it holds, each checked
    assigned, replaced = _read_python(path)
    templates = [t for t in assigned.get("template", []) if isinstance(t, str)]
    _check(len(templates) >= 2, path, f"{len(templates)} template literal(s), expected two (analysis, reply)")
    analysis, reply = templates[:2]
    target = _first(assigned.get("target_prompt", []), path, "target_prompt", (str, dict))
    if isinstance(target, dict):   # RLVER: a table by purpose; its trainer plays "eq" (heart-to-heart talk)
        target = _first([target.get("eq")], path, 'target_prompt["eq"]')
    for what, text, names in (("analysis template", analysis, "emotion dialog_history target"),
                              ("reply template", reply, "emotion dialog_history new_history planning target")):
        missing = [f"{{{{{n}}}}}" for n in names.split() if f"{{{{{n}}}}}" not in text]
        _check(not missing, path, f"the {what} lacks {', '.join(missing)}")
    headers = tuple(re.findall(r"^(\w+):[ \t]*$", analysis, re.MULTILINE))
    _check(headers and headers[-1] == "Change" and "Response:" in reply, path,
           "the analysis output format must end in 'Change:' and the reply's hold 'Response:'")
    planning = _terms(_first(replaced.get("{{planning}}", []), path,
                             "{{planning}} expression over the analysis sections", ast.BinOp), path)
    unknown = [k for kind, k in planning if kind == "section" and k.lower() not in map(str.lower, headers)]
    _check(not unknown, path, f"{{{{planning}}}} reads section(s) {unknown} that the analysis format "
                              f"{list(headers)} lacks")
    history = [getattr(a, "value", None) for a in replaced.get("{{dialog_history}}", [])]
    return dict(target=target, analysis=analysis, reply=reply, headers=headers, planning=planning,
                opening_planning=_first(assigned.get("analyse", []), path, "opening planning line"),
                opening_history=_first(history, path, "opening text for {{dialog_history}}"))


def load_official_prompts(path, protocol, think, quirks=False, simulator="an LLM"):   # the authors' prompts, checked
    if simulator == "rules":
        raise ProfileError("--official-prompts needs an LLM simulator (--simulator URL or model folder), not rules")
    if protocol not in OFFICIAL_SIMULATOR:
        raise ProfileError(f"--official-prompts needs --protocol sage or rlver (the authors' games), not {protocol}")
    if quirks and protocol != "rlver":
        raise ProfileError("--official-quirks reproduces RLVER's trainer (its analysis always sees the start "
                           "emotion); SAGE has no such quirk: drop the flag or use --protocol rlver")
    root, (policy_file, variable) = official_root(path), OFFICIAL_POLICY["think" if think else protocol]
    sim_path, policy_path = root / OFFICIAL_SIMULATOR[protocol], root / policy_file
    found = _simulator_prompts(sim_path)
    policy = _first(_read_python(policy_path)[0].get(variable, []), policy_path, variable)
    return OfficialPrompts(source=OFFICIAL_SIMULATOR[protocol].split("/")[0], policy=policy,
                           policy_source=f"{policy_file}:{variable}", start_emotion_quirk=bool(quirks),
                           files={str(p.relative_to(root)): _sha256(p) for p in (sim_path, policy_path)}, **found)


def official_profiles_path(path):   # SAGE's scenarios: eval's profiles under --official-prompts
    p = official_root(path) / "SAGE/profile/simulator_profile_withfirsttalk.jsonl"
    if not p.is_file():
        raise ProfileError(f"--official-prompts: {p} not found: give --profiles or a checkout with SAGE's scenarios")
    return p


def _official_request(profile, template, first, history, new_history=None):   # their order, the dialogue last
    p = profile.prompts
    values = first + [("target", p.target), ("simulator_role", profile.persona), ("player_type", profile.persona),
                      ("simulator_scene", profile.scenario), ("player_topic", profile.scenario)]
    values += [("dialog_history", history)] + ([("new_history", new_history)] if new_history is not None else [])
    return [{"role": "user", "content": _fill(template, values, brace=("{{", "}}"))}]


def _official_history(episode, agent_reply):   # their JSON history: (all but the last two, those two, all)
    messages = [{"role": OFFICIAL_ROLES[r], "content": c} for r, c in _messages(episode) + [("assistant", agent_reply)]]
    return [json.dumps(part, ensure_ascii=False, indent=2) for part in (messages[:-2], messages[-2:], messages)]


# ----------------------------------------------------------------------------------------------------
# 4. The output format. Strict, so the reward is verifiable:
#     <thought>(i) how the reply changes my emotion (ii) how I feel now (iii) how I will answer</thought>
#     <change>+6</change>
#     <reply>what the user says next</reply>
# Tolerated: whitespace, tag case, a sign ("+6", "- 3", "−3"), code fences, text around the sections, a leading
# <think> block, a missing </reply> at the very end. Rejected (ParseError): see _tagged.

_SECTION = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.I | re.S) for tag in ("thought", "change", "reply")}
_OPEN_REPLY = re.compile(r"<reply>(.*)\Z", re.I | re.S)   # truncated: no </reply>


def _text(text):   # every parser's first check (a JSON null is no answer)
    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}")
    return text


def _tagged(text, tags):
    """The stripped <tag> sections, the change an int; ParseError: sections missing, a change not an integer
    ("5.5", "five", "+5 points"), an empty reply."""
    text = re.sub(r"\A\s*<think>.*?</think>", "", _text(text), flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"^\s*```[\w-]*\s*$", "", text, flags=re.MULTILINE)
    found = {tag: _SECTION[tag].search(text) or (_OPEN_REPLY.search(text) if tag == "reply" else None) for tag in tags}
    missing = [f"<{tag}>" for tag, m in found.items() if m is None]
    if missing:
        raise ParseError(f"missing section(s) {', '.join(missing)}")
    sections = {tag: m.group(1).strip() for tag, m in found.items()}
    if "change" in sections:
        change = sections["change"].replace("\u2212", "-")   # unicode minus
        if not re.fullmatch(r"[+-]?\s*\d+", change):
            raise ParseError(f"<change> must be an integer, got {change[:40]!r}")
        sections["change"] = int(re.sub(r"\s", "", change))
    if sections.get("reply") == "":
        raise ParseError("empty <reply>")
    return [sections[tag] for tag in tags]


def parse_simulator_output(text):   # one call -> (thought, change clamped to +-MAX_ABS_CHANGE, reply)
    thought, change, reply = _tagged(text, ("thought", "change", "reply"))
    return thought, max(-MAX_ABS_CHANGE, min(MAX_ABS_CHANGE, change)), reply


def parse_analysis_output(text):   # two-stage call 1 -> (thought, change), unclamped
    return tuple(_tagged(text, ("thought", "change")))


def parse_reply_output(text):   # two-stage call 2 and the opening -> the <reply> text
    return _tagged(text, ("reply",))[0]


def _strip(text, chars=("\n", "[", "]")):   # their cleaning of a section: text.strip(c) for each c in turn
    return functools.reduce(str.strip, chars, text)


def parse_official_analysis(prompts, text):
    """Their analysis parse -> ({{planning}} built from the sections, the first signed integer of Change).
    Section H = text.split("H:")[-1].split("<next header>:\n")[0], _strip-ed (RLVER folds blank lines too)."""
    text = _text(text).replace("：", ":").replace("*", "")
    sections = {}
    for h, after in zip(prompts.headers, prompts.headers[1:] + (None,)):
        part = text.split(h + ":")[-1]
        part = _strip(part.split(after + ":\n")[0] if after else part)
        sections[h.lower()] = part.replace("\n\n", "\n") if prompts.source == "RLVER" else part
    change = re.findall(r"[+-]?\d+", sections["change"])
    if not change:
        raise ParseError(f"no integer in the Change section: {sections['change'][:60]!r}")
    planning = "".join(v if kind == "text" else sections[v.lower()] for kind, v in prompts.planning)
    return planning, int(change[0])


def parse_official_reply(text):   # the text after the last 'Response:', _strip-ed, quotes too
    return _strip(_text(text).split("Response:")[-1], ("\n", "[", "]", "\u201c", "\u201d"))


def format_simulator_output(thought, change, reply):   # the format above, as RulesBackend writes it
    return f"<thought>\n{thought}\n</thought>\n<change>{change:+d}</change>\n<reply>\n{reply}\n</reply>"


# ----------------------------------------------------------------------------------------------------
# 5. The turn loop. One dialogue's simulated turn is a generator (user_turn) that yields Requests and is sent
# their answers; Turns drives many over one backend (submit(request) -> Future) and alone waits on it.

@dataclass
class Request:
    messages: list            # the chat, which LLM backends send as it is
    stage: str = "chat"       # the simulated user's "turn", "analysis", "reply" or "opening"; "chat": a policy's
    mode: str = "vanilla"     # the fields below are what RulesBackend reads instead of the messages
    lang: str = "en"
    need: str = ""            # the profile's hidden intention
    emotion: int = 0          # the user's emotion when the turn began
    reply: str = ""           # what the user sees of the agent's reply (visible_reply)
    change: int = 0           # the reply stage: the change the analysis wrote
    official: bool = False    # the authors' prompts (section 3b), written for an LLM


def _request(episode, shown, mode, step, analysis="", change=0):   # build_request's messages and the turn's fields
    p = episode.profile
    return Request(build_request(episode, shown, mode, step, analysis, change), step, mode, p.lang,
                   p.hidden_intention, episode.emotion, shown, change, bool(p.prompts))


def settle(future, fn, *args):   # future gets fn(*args) or its exception, unless cancelled meanwhile; returns it
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
    return future


def ask(request, parse, retries):
    """Ask until the answer parses, at most 1 + retries times (a generator: it yields the request and is sent
    the answer). Returns (parsed, None), or (None, the last parse error with the offending output)."""
    for _ in range(retries + 1):
        output = yield request
        try:
            return parse(output), None
        except ParseError as e:   # the offending output rides along (truncated) for the trainer's warning
            error = f"{e}; output: {str(output)[:160]!r}"
    return None, error


def apply_change(emotion, change, protocol):
    """The CODE applies the change (the verifiable part), clamped as the protocol says: (change, emotion in 0..100)."""
    limit = protocol_of(protocol).max_change
    if limit is not None:
        change = max(-limit, min(limit, change))
    return change, max(0, min(100, emotion + change))


def user_turn(episode, agent_reply, mode="vanilla", max_turns=8, retries=2):
    """The simulated user's answer to one agent reply, recorded in the episode (a generator of Requests, see ask):
    one call (thought, change, reply) or two (the analysis' thought and change, then the reply). A stage unparseable
    after `retries` re-asks counts as change 0 and/or a fallback reply. Returns the user's message, None at the end."""
    if episode.done:
        return None
    if "<think>" in (agent_reply or "") and "</think>" not in agent_reply:   # cut inside its <think>: no reply, the end
        episode.messages.append({"role": "assistant", "content": agent_reply.strip()})
        episode.cut_thoughts, episode.done, episode.end_reason = 1, True, "thought_cut"
        return None
    protocol, prompts, shown = episode.profile.protocol, episode.profile.prompts, visible_reply(agent_reply)
    if protocol_of(protocol).stages == 1:
        parsed, error = yield from ask(_request(episode, shown, mode, "turn"), parse_simulator_output, retries)
        analysis, user_reply, reply_error = parsed and parsed[:2], parsed and parsed[2], error
    else:
        parse = functools.partial(parse_official_analysis, prompts) if prompts else parse_analysis_output
        analysis, error = yield from ask(_request(episode, shown, mode, "analysis"), parse, retries)
        thought, change = analysis or ("", 0)   # the reply stage sees the analysis and the band after the change
        user_reply, reply_error = yield from ask(_request(episode, shown, mode, "reply", thought, change),
                                                 parse_official_reply if prompts else parse_reply_output, retries)
    failed = analysis is None or user_reply is None
    thought, change = analysis or (f"(unparseable simulator output: {error})", 0)
    if user_reply is None:   # (an empty reply that parsed stays empty, as SAGE keeps it)
        user_reply = FALLBACK_REPLY[episode.profile.lang]
        thought += f" (reply unparseable: {reply_error})" if analysis else ""
    episode.parse_failures += failed
    episode.changes_out_of_range += protocol_of(protocol).max_change is None and abs(change) > 100
    change, episode.emotion = apply_change(episode.emotion, change, protocol)   # the code, not the LLM
    episode.messages += [{"role": "assistant", "content": (agent_reply or "").strip()},
                         {"role": "user", "content": user_reply}]
    episode.turns.append({"turn": len(episode.turns) + 1, "agent": shown, "thought": thought, "change": change,
                          "emotion": episode.emotion, "user": user_reply, "parse_failed": failed})
    episode.end_reason = dialogue_end(episode.emotion, len(episode.turns), max_turns, user_reply, protocol)
    episode.done = episode.end_reason is not None
    return None if episode.done else user_reply


class Turns:
    """The turns in flight over one backend, by key, each a generator (user_turn, ask). While collect() waits, a turn
    older than turn_deadline s (re-asks, stages included) raises SimulatorError; a log line every progress_every s."""
    poll_s = 0.25   # how often a waiting collect() wakes up (Ctrl-C, the deadline, progress lines)

    def __init__(self, backend, turn_deadline=600.0, progress_every=15.0, log=None):
        self.backend, self.turn_deadline, self.progress_every, self.log = backend, turn_deadline, progress_every, log
        self.pending = {}     # key -> (turn, the future of its current request, when the turn began)
        self.ended = []       # (key, result) not yet collected
        self.asked = self.answered = 0

    def start(self, key, turn, answer=None, began=None):   # send the turn its answer (None: its first), submit its next
        try:
            request = turn.send(answer)
        except StopIteration as end:
            self.ended.append((key, end.value))
            return
        self.pending[key] = (turn, self.backend.submit(request), time.monotonic() if began is None else began)
        self.asked += 1

    def collect(self, wait):
        """[(key, result)] of the turns that ended; wait: block until one has (while any is in flight)."""
        last_line, role = time.monotonic(), self.backend.role
        while True:
            done = [(key, turn, future, began) for key, (turn, future, began) in self.pending.items() if future.done()]
            for key, turn, future, began in done:
                del self.pending[key]
                self.answered += 1
                self.start(key, turn, future.result(), began)   # (a backend's error is raised here)
            if done:
                continue   # (a backend that answers at once may have answered the next request already)
            if self.ended or not wait or not self.pending:
                ended, self.ended = self.ended, []
                return ended
            now, began = time.monotonic(), min(b for _, _, b in self.pending.values())
            if now - began >= self.turn_deadline:
                raise SimulatorError(f"{self.backend.where}: only {self.answered}/{self.asked} requests answered "
                                     f"within the turn deadline of {self.turn_deadline:g} s (re-asks and stages "
                                     f"included); the {role} is overloaded or stuck, or raise --{role}-turn-deadline")
            if self.log and self.progress_every and now - last_line >= self.progress_every:
                self.log(f"{role}: {self.answered}/{self.asked} answered, {now - began:.0f} s")
                last_line = now
            futures = [f for _, f, _ in self.pending.values()]
            concurrent.futures.wait(futures, min(self.poll_s, self.turn_deadline - (now - began)), "FIRST_COMPLETED")

    def close(self):   # abandon the requests in flight (an error, Ctrl-C): a backend skips those it has not sent yet
        for _, future, _ in self.pending.values():
            future.cancel()
        self.pending.clear()


def play_turns(backend, turns, turn_deadline=600.0, progress_every=15.0, log=None):
    """Drive every turn generator to its end over `backend` (Turns). Returns their results, in order."""
    results, flight = {}, Turns(backend, turn_deadline, progress_every, log)
    try:
        for key, turn in enumerate(turns):
            flight.start(key, turn)
        while len(results) < len(turns):
            results.update(flight.collect(wait=True))
    finally:
        flight.close()
    return [results[key] for key in range(len(turns))]


def simulate_turn(episodes, agent_replies, backend, mode="vanilla", max_turns=8, retries=2, **wait):
    """Every unfinished episode one turn on, all in flight at once (wait: Turns' knobs). Returns user_turn's."""
    if len(agent_replies) != len(episodes):
        raise ValueError(f"got {len(agent_replies)} agent replies for {len(episodes)} episodes")
    if max_turns < 1 or retries < 0:
        raise ValueError(f"need max_turns >= 1 and retries >= 0, got {max_turns} and {retries}")
    return play_turns(backend, [user_turn(ep, text, mode, max_turns, retries)
                                for ep, text in zip(episodes, agent_replies)], **wait)


# ----------------------------------------------------------------------------------------------------
# 6. Backends: role and where (for errors), check() (fail fast before heavy work), submit(request) -> Future.

class Backend:
    """A backend that answers at once, in the caller's thread: answer(request) -> text."""
    role, where = "simulator", "the simulator"

    def check(self):
        pass

    def submit(self, request):
        return settle(concurrent.futures.Future(), self.answer, request)


class Scripted(Backend):
    """Answers each request with answer(messages): a replayed or scripted user or policy (replay, tests)."""

    def __init__(self, answer):
        self.answer = lambda request: answer(request.messages)


# 6a. RulesBackend: a deterministic user without an LLM. From the request's fields (never its text) it counts
# the cue words of prompts/rules_cues.json (its _doc: the scoring) and answers in our tagged format. Counting
# common words makes the reward GRADED: even a tiny random policy's token soup hits a cue now and then. The
# user's line is canned for the size of the change, a hash of the messages picking the variant (no RNG).

def _cue_pattern(cue):
    """Regex for one cue: whole words ("you" matches "you're", not "youth"); "feel*" is a prefix; a cue
    starting with punctuation ("?") or with non-ASCII text (Chinese triggers) is matched literally."""
    if not cue[0].isalnum() or not cue.isascii():
        return re.compile(re.escape(cue))
    words = r"\s+".join(re.escape(w) for w in cue.rstrip("*").split())
    return re.compile(r"(?<!\w)" + words + ("" if cue.endswith("*") else r"(?!\w)"))


PLANS = {"leave": "I will end the conversation.", "helped": "I will thank them.",  # the (iii) line per bucket
         "much_worse": "I will pull back and say less.", "worse": "I will hold back a little.",
         "flat": "I will keep it short and see if they get it.", "better": "I will open up a little more.",
         "much_better": "I will tell them more."}


class RulesBackend(Backend):
    where = "the rules simulator"

    def __init__(self, cues_path=PROMPTS_DIR / "rules_cues.json"):
        try:
            self.table = json.loads(Path(cues_path).read_text(encoding="utf-8"))
            self.cues = {name: [_cue_pattern(c) for c in cues] for name, cues in self.table["cues"].items()}
            self.needs = {name: ([_cue_pattern(c) for c in need["triggers"]], [_cue_pattern(c) for c in need["cues"]])
                          for name, need in self.table["needs"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise SimulatorError(f"cannot load rules cue file {cues_path}: {e!r}") from None

    def __repr__(self):
        return "RulesBackend()"

    def _count(self, patterns, text):   # the patterns' hits in text, at most per_cue_cap each
        return sum(min(len(p.findall(text)), self.table["per_cue_cap"]) for p in patterns)

    def needs_of(self, hidden_intention):   # the needs whose trigger words occur in a hidden intention
        text = hidden_intention.lower()
        return [name for name, (triggers, _) in self.needs.items() if any(t.search(text) for t in triggers)]

    def score(self, reply, hidden_intention, mode="vanilla"):   # the emotion change for one reply, and its counts
        rules, text = self.table["modes"][mode], reply.lower().replace("\u2019", "'")
        hits = {name: self._count(patterns, text) for name, patterns in self.cues.items()}
        hits["need"] = sum(self._count(self.needs[n][1], text) for n in self.needs_of(hidden_intention))
        points = rules["base"]
        for name in ("warmth", "question", "lecturing", "dismissive"):
            each, cap = rules[name]["each"], rules[name]["cap"]
            points += max(each * hits[name], cap) if cap < 0 else min(each * hits[name], cap)
        if hits["need"]:
            need = rules["need"]
            points += min(need["first"] + need["each"] * (hits["need"] - 1), need["cap"])
        # words: runs of non-CJK word characters, plus one per two Chinese characters
        n_words = len(re.findall(r"[^\W\u3400-\u9fff]+", text)) + len(re.findall(r"[\u3400-\u9fff]", text)) // 2
        if n_words < self.table["short_words"]:
            points += rules["short"]     # a brush-off (or nothing at all)
        elif n_words > self.table["long_words"]:
            points += rules["long"]      # a wall of text / advice dump
        low, high = rules["clamp"]
        return max(low, min(high, points)), hits

    def answer(self, request):
        if request.official or request.stage not in ("turn", "analysis", "reply", "opening"):
            raise SimulatorError("RulesBackend only understands requests made by simulator.build_request "
                                 "from the templates in prompts/")
        system, turn = request.messages[0]["content"], request.messages[-1]["content"]
        pick = hashlib.sha256((system + "\0" + turn).encode("utf-8")).digest()[0]
        if request.stage == "opening":
            lines = self.table["openings"][request.lang]
            return f"<reply>\n{lines[pick % len(lines)]}\n</reply>"
        change, hits = ((request.change, None) if request.stage == "reply"   # written from the analysis' change
                        else self.score(request.reply, request.need, request.mode))
        emotion = max(0, min(100, request.emotion + change))
        bucket = ("leave" if emotion <= 0 else "helped" if emotion >= 100 else "much_worse" if change <= -5   # (PLANS)
                  else "worse" if change < 0 else "flat" if change == 0 else "better" if change < 5 else "much_better")
        variants = self.table["replies" if request.lang == "en" else "replies_zh"][bucket]
        if request.stage == "reply":
            return f"<reply>\n{variants[pick % len(variants)]}\n</reply>"
        # (i) why the emotion moved, (ii) how the user feels now, (iii) how it will answer
        why = (f"(i) The reply had {hits['warmth']} warm or validating words, {hits['question']} question cues, "
               f"{hits['lecturing']} lecturing and {hits['dismissive']} dismissive cues, and it "
               f"{'touched' if hits['need'] else 'missed'} what I really need; my emotion changes by {change:+d}.")
        feeling = next(text for bound, text in self.table["feelings"] if emotion <= bound)
        thought = f"{why} (ii) I feel {feeling} ({emotion}/100). (iii) {PLANS[bucket]}"
        if request.stage == "analysis":   # (the mark shows a reader what the rules decided)
            return (f"<thought>\n{thought} [change {change:+d}, emotion {emotion}]\n</thought>\n"
                    f"<change>{change:+d}</change>")
        return format_simulator_output(thought, change, variants[pick % len(variants)])


# 6b. OpenAIBackend: any OpenAI-compatible /chat/completions server, stdlib only. `concurrency` DAEMON threads
# serve the backend's life from one queue (a ThreadPoolExecutor joins its workers at exit: a request stuck on
# a silent server would hold up Ctrl-C). Retried on 408/429/5xx, timeouts, resets and unreadable bodies after
# Retry-After, else backoff * 2^attempt, capped at max_wait; other 4xx fail at once. The key is redacted.

def retry_after_seconds(value, now=None):
    """A Retry-After header (RFC 9110: delay-seconds "120" or an HTTP date) -> seconds to wait >= 0, or None."""
    with contextlib.suppress(TypeError, ValueError):
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        when = when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)   # an HTTP date is GMT
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


class OpenAIBackend(Backend):
    """concurrency: requests in flight; timeout: seconds per HTTP request (retried); max_retries: attempts after
    the first; role, unreachable_hint: word the errors (benchmark.py's policy endpoint)."""

    def __init__(self, url, model=None, api_key_env="OPENAI_API_KEY", concurrency=16, timeout=120.0,
                 max_retries=4, backoff=1.0, max_wait=60.0, temperature=0.7, max_tokens=1024, role="simulator",
                 unreachable_hint="start the server or pass --simulator rules"):
        self.role, self.unreachable_hint = role, unreachable_hint
        if not re.match(r"https?://[^/]", url or ""):
            raise ValueError(f"{role} URL must start with http:// or https://, got {url!r}")
        url = url.rstrip("/")
        if url.endswith("/chat/completions"):
            url = url[: -len("/chat/completions")]
        elif url.count("/") == 2:          # bare "http://host:port": assume the usual /v1 prefix
            url += "/v1"
        self.base, self.url, self.where = url, url + "/chat/completions", f"{role} endpoint {url}/chat/completions"
        self.model, self.api_key_env, self.timeout, self.max_retries = model, api_key_env, timeout, max_retries
        self.backoff, self.max_wait, self.temperature, self.max_tokens = backoff, max_wait, temperature, max_tokens
        self._api_key = os.environ.get(api_key_env) or None   # no key is fine for local servers
        self._todo = queue.SimpleQueue()   # (future, messages) for the worker threads
        for _ in range(concurrency):
            threading.Thread(target=self._work, name=f"{role}-http", daemon=True).start()

    def __repr__(self):   # never shows the key
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text):
        return str(text).replace(self._api_key, "***") if self._api_key else str(text)

    def _http(self, method, url, payload=None, timeout=None):   # one HTTP exchange -> its parsed JSON body
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def check(self):   # fail fast, before any heavy work, if the endpoint is unreachable or rejects the key
        try:
            listing = self._http("GET", self.base + "/models", timeout=min(self.timeout, 10))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise SimulatorError(f"{self.where} rejected the request (HTTP {e.code}); "
                                     f"put a valid API key in ${self.api_key_env}") from None
            return                          # reachable; this server just has no /models route
        except (OSError, http.client.HTTPException) as e:   # URLError, refused, timeout, reset, DNS
            raise SimulatorError(f"cannot reach {self.where}: {self._redact(getattr(e, 'reason', e))}; "
                                 f"{self.unreachable_hint}") from None
        except ValueError:
            return                          # reachable, answered something that is not JSON
        with contextlib.suppress(KeyError, IndexError, TypeError):   # the given model, else the first listed
            self.model = self.model or listing["data"][0]["id"]

    def submit(self, request):
        if self.model is None:   # check() asks the server which model it serves (vLLM needs the name)
            self.check()
            self.model = self.model or "default"
        future = concurrent.futures.Future()
        self._todo.put((future, request.messages))
        return future

    def _work(self):   # a worker thread: the next request, for the backend's whole life
        while True:
            future, messages = self._todo.get()
            settle(future, self._complete, messages, future)

    def _complete(self, messages, future):
        """One chat request -> completion text, with retries. Returns None, unsent, once `future` is cancelled."""
        payload = dict(model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        for attempt in range(self.max_retries + 1):
            if future.cancelled():   # abandoned (Turns.close): not sent
                return None
            retry_after = None
            try:
                answer = self._http("POST", self.url, payload)
                return answer["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                body = ""
                with contextlib.suppress(Exception):   # (the body may be gone with the connection)
                    body = e.read()[:300].decode("utf-8", errors="replace")
                last_error = f"HTTP {e.code} {body}".strip()
                if e.code < 500 and e.code not in (408, 429):   # not busy or broken: our mistake, no retry
                    hint = f"; check the API key in ${self.api_key_env}" if e.code in (401, 403) else ""
                    raise SimulatorError(f"{self.where} refused the request "
                                         f"({self._redact(last_error)}){hint}") from None
                retry_after = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            except (OSError, http.client.HTTPException) as e:       # timeout, refused, reset
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:   # 200 with a body we cannot read
                last_error = f"malformed response: {e!r}"
            if attempt < self.max_retries:   # the wait: Retry-After, else backoff * 2^attempt; capped at max_wait
                time.sleep(min(self.max_wait, self.backoff * 2 ** attempt if retry_after is None else retry_after))
        raise SimulatorError(f"{self.where} failed after {self.max_retries + 1} attempts: {self._redact(last_error)}")


# 6c. LocalModelBackend: an LLM simulator in this process. One daemon worker answers every request pending at
# that moment (up to batch_size) in one model.generate call with its own seeded generator (which requests share
# a batch depends on timing, so at temperature > 0 an answer does too).

class LocalModelBackend(Backend):
    where = "the local simulator model"

    def __init__(self, model, tokenizer, max_new_tokens=512, temperature=0.7, seed=0, batch_size=16):
        import torch
        from model import stop_token_ids
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.eos_ids = stop_token_ids(tokenizer)   # EOS + the checkpoint's configured stop ids
        self._todo = queue.SimpleQueue()   # (future, messages)
        threading.Thread(target=self._work, name="simulator-model", daemon=True).start()

    def __repr__(self):
        return f"LocalModelBackend(max_new_tokens={self.max_new_tokens}, temperature={self.temperature})"

    def submit(self, request):
        future = concurrent.futures.Future()
        self._todo.put((future, request.messages))
        return future

    def _work(self):   # the worker thread: every request pending now, in one generate call
        while True:
            batch = [self._todo.get()]
            while len(batch) < self.batch_size and not self._todo.empty():
                batch.append(self._todo.get())
            batch = [(f, m) for f, m in batch if not f.cancelled()]
            texts = settle(concurrent.futures.Future(), self.generate, [m for _, m in batch])   # (or every one's error)
            for k, (future, _) in enumerate(batch):
                settle(future, lambda: texts.result()[k])

    def generate(self, requests):   # completion texts for chat requests (lists of messages), in one generate call
        from model import generate   # (under no_grad)
        prompts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in requests]
        prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        new_ids, _ = generate(self.model, prompts, self.max_new_tokens, self.eos_ids, temperature=self.temperature,
                              generator=self.generator)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def make_backend(spec, *, model_name=None, api_key_env="OPENAI_API_KEY", device="cpu", timeout=120.0, **kwargs):
    """6d. From a CLI string: 'rules', an http(s):// URL or a local model folder; kwargs go to the backend."""
    spec = str(spec)
    if spec == "rules":
        return RulesBackend(**kwargs)
    if re.match(r"https?://", spec):
        return OpenAIBackend(spec, model=model_name, api_key_env=api_key_env, timeout=timeout, **kwargs)
    if Path(spec).is_dir():
        from model import load_model, load_tokenizer
        return LocalModelBackend(load_model(spec, device=device), load_tokenizer(spec), **kwargs)
    raise ValueError(f"unknown simulator {spec!r}: use 'rules', an http(s):// URL of an OpenAI-compatible "
                     f"server, or a local model folder")


# ----------------------------------------------------------------------------------------------------
# 7. Command-line flags shared by rlver.py and benchmark.py eval: same names, same meanings

class Parser(argparse.ArgumentParser):
    """argparse whose bad input is one line naming the flag, exit 2 ("rlver: error: --lr -1.0: must be > 0");
    name: the line's first word (default: prog; a subcommand's parser gets its own prog, "benchmark.py eval")."""

    def __init__(self, *args, name=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name or self.prog

    def error(self, message):
        message = re.sub(r"^argument (\S+): ", r"\1 ", message)
        self.exit(2, f"{self.name}: error: {message}\n")


def in_range(low, high=math.inf, kind=float, above=False):
    """An argparse type: a finite `kind` in [low, high] (above: > low); else argparse's line naming the flag."""
    rule = f"in [{low}, {high}]" if high < math.inf else f"> {low}" if above else f">= {low}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{value}: give a finite number")
        if not low <= value <= high or (above and value == low):
            raise argparse.ArgumentTypeError(f"{value}: must be {rule}")
        return value
    return parse


def add_simulator_flags(add, protocol, max_parse_failure_rate):
    """The simulated user's flags (add: a parser's add_argument), with the defaults where the CLIs differ:
    training plays --protocol rlver and stops past 0.5 unparseable turns, eval plays sage and refuses any."""
    add("--simulator", default="rules", help="'rules', an OpenAI-compatible URL, or a local model folder")
    add("--simulator-model", default=None, help="model name for a simulator endpoint (default: the first it lists)")
    add("--simulator-key-env", default="OPENAI_API_KEY", help="env var holding the simulator endpoint's API key")
    add("--mode", choices=MODES, default="vanilla", help="simulated-user environment: vanilla or challenging")
    add("--protocol", choices=list(PROTOCOLS), default=protocol, help="dialogue rules (simulator.PROTOCOLS): rlver "
        "= RLVER's training simulator (start 30, two-stage, goodbye ends); sage = SAGE's test loop; classic = ours")
    add("--official-prompts", default=None, metavar="DIR", help="play the authors' own simulator and policy "
        "prompts, read from your checkout of their digitalhuman repository (its root, SAGE/ or RLVER/)")
    add("--official-quirks", action="store_true", help="with --official-prompts under rlver: every analysis call "
        "sees the start emotion, as the official trainer's code does (the paper: the live emotion)")
    add("--max-turns", type=in_range(1, kind=int), default=None,
        help="scored policy replies per dialogue (default: the protocol's; rlver 9 = official max_turns 8)")
    add("--simulator-timeout", type=in_range(0, above=True), default=120.0, help="seconds per simulator HTTP request")
    add("--simulator-turn-deadline", type=in_range(0, above=True), default=600.0,
        help="seconds for all simulator answers of one turn; past it the run stops")
    add("--max-parse-failure-rate", type=in_range(0, 1), default=max_parse_failure_rate, help="stop when more "
        "than this share of the simulator's turns (a training step's, an eval's) stays unparseable")


def backend_from_flags(args, device):
    """The simulated user add_simulator_flags' flags name, its endpoint reachable (SimulatorError otherwise)."""
    try:
        backend = make_backend(args.simulator, model_name=args.simulator_model, api_key_env=args.simulator_key_env,
                               device=device, timeout=args.simulator_timeout)
    except ValueError as e:   # an unknown spec, a malformed URL, a bad model folder (model.CheckpointError)
        raise SimulatorError(f"--simulator: {e}") from None
    backend.check()
    return backend
