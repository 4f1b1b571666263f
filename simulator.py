"""
The simulated user: RLVER's environment and the source of its verifiable emotion reward.

RLVER (Wang et al. 2025, arXiv 2507.03112) trains a dialogue agent against a simulated user built from
a profile: a persona, a scenario, a hidden intention (what the user truly needs) and an opening message.
The simulated user is the "sentient agent" of SAGE (arXiv 2505.02847): it carries an emotion score in
[0, 100], and after every agent reply it

    (i)   reasons about how the reply changes its emotion,
    (ii)  describes how it feels now,
    (iii) decides how to answer,

then writes an integer emotion change and its reply. The CODE, not the simulator, adds the change:

    emotion <- clamp(emotion + change, 0, 100)

How the change is clamped, where the dialogue starts and ends (emotion lines, goodbye words, max turns; a
turn = one agent reply + the user's answer) and whether the simulator answers in one call or two (analysis ->
change, then the reply from that analysis and a coarse band) is the PROTOCOL (section 2: classic = ours,
rlver = RLVER's training simulator, sage = SAGE's evaluation loop). The reward is final emotion / 100: it is
"verifiable" because it is plain arithmetic over the simulator's parsed output.

Reading order of this file:
  1. profiles        Profile, load_profiles (our JSONL and the public RLVER/SAGE layout), builtin_profiles
  2. protocols       PROTOCOLS, prepare_profiles (start emotion, language, openings the simulator writes)
     episodes        Episode, new_episode, reward; the rules this file alone owns: visible_reply (what the
                     user sees of a policy message), dialogue_end (how a dialogue ends), transcript (the
                     JSON record of a dialogue)
  3. prompts         build_request / build_reply_request / build_opening_request from the templates in
                     prompts/ (English, and <name>_zh.txt in Chinese)
     official        OfficialPrompts, load_official_prompts: the authors' prompts read from the user's
                     checkout (--official-prompts), filled and parsed as their code does
  4. output format   parse_simulator_output / format_simulator_output (the strict tagged format)
  5. the turn loop   Request, user_turn (one dialogue's turn: ask, parse, re-ask, apply_change), Turns (the
                     turns in flight over one backend: the turn deadline, progress lines), simulate_turn
  6. backends        RulesBackend (deterministic cue counting), OpenAIBackend (HTTP), LocalModelBackend,
                     make_backend (from a CLI string)

Every backend has `submit(request: Request) -> concurrent.futures.Future[str]`: a Request carries the chat
messages, which LLM backends send as they are, and the turn's fields (stage, mode, emotion, hidden need, the
agent's visible reply), which RulesBackend reads instead of the prompt text. Each backend owns its threads
(HTTP: a pool of `concurrency`; local model: one worker that batches what is pending; rules: none). All of
them answer in the same format, so a single parser serves LLM simulators and the rules backend alike.
"""
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
MAX_ABS_CHANGE = 30                  # a parsed change is clamped to [-30, 30]: no single reply moves the user
                                     # by more than ~a third of the scale (the templates say so too)
FALLBACK_REPLY = "Sorry, I lost my train of thought. What were you saying?"  # when the simulator fails
FALLBACK_REPLY_ZH = "抱歉，我刚才走神了。你刚才说什么？"
FALLBACK_OPENING = {"en": "I've had a rough few weeks and I need to talk to someone.",
                    "zh": "最近心里有点堵，想找个人说说。"}
EMPTY_REPLY = "(the supporter sent an empty message)"  # shown to the simulator for an empty agent reply
LANGS = ("en", "zh")
# What the simulator's user-side prompt calls the two speakers, per language
SPEAKERS = {"en": ("You", "Supporter"), "zh": ("你", "倾诉对象")}
FORMAT_HEADERS = ("## Output format", "## 输出格式")   # where a mode template's one-call format section starts


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
    opening: str            # the user's first message; "" = the simulator writes one (open_episodes)
    initial_emotion: int = None   # None = the protocol's default (PROTOCOLS[...].initial_emotion)
    traits: list = field(default_factory=list)   # personality words, e.g. ["avoidant", "guarded"]
    lang: str = None        # "en" / "zh": which templates the simulator and the policy get (None: detect_lang)
    protocol: str = "classic"   # the dialogue rules this user plays by (PROTOCOLS; set by prepare_profiles)
    opening_written: bool = False   # True: the simulator wrote the opening (the profile had none)
    prompts: "OfficialPrompts" = None   # the authors' prompts read from the user's checkout (section 3b); None: ours


# Our layout, and aliases: (our field, accepted keys in order of preference).
OUR_KEYS = [("persona", ("persona",)), ("scenario", ("scenario", "background")),
            ("hidden_intention", ("hidden_intention",)), ("opening", ("opening", "topic"))]
# The public RLVER/SAGE release (Chinese text): player->persona, scene->scenario, task->hidden_intention,
# first_talk->opening, main_cha + cha_group -> traits.
PUBLIC_KEYS = [("persona", ("player",)), ("scenario", ("scene",)), ("hidden_intention", ("task",)),
               ("opening", ("first_talk",))]
OPTIONAL = {"opening"}   # RLVER's train_profile.jsonl has no first_talk: the simulator writes the opening


def _profile_from_record(record, where, default_id):
    """One JSON object -> Profile. `where` = "file:line" for error messages."""
    if not isinstance(record, dict):
        raise ProfileError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    for key, value in record.items():  # JSON may escape a lone surrogate (\ud800), which no UTF-8 text can hold
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ProfileError(f"{where}: field '{key}' holds invalid Unicode ({e.reason} {e.object[e.start:e.end]!a}"
                               f"): fix that text in the file") from None
    public = "player" in record or "first_talk" in record   # the public layout is recognised by its keys
    table = PUBLIC_KEYS if public else OUR_KEYS
    missing = [" or ".join(keys) for name, keys in table
               if not any(k in record for k in keys) and not (public and name in OPTIONAL)]
    if missing:
        layout = "public RLVER" if public else "rlver"
        raise ProfileError(f"{where}: profile is missing key(s) {', '.join(missing)} ({layout} layout; "
                           f"expected {[k[0] for _, k in table]})")
    fields = {}
    for name, keys in table:
        if public and name in OPTIONAL and not any(k in record for k in keys):
            fields[name] = ""                                   # written later by the simulator
            continue
        value = next(record[k] for k in keys if k in record)
        if not isinstance(value, str) or not value.strip():
            raise ProfileError(f"{where}: '{keys[0]}' must be a non-empty string")
        fields[name] = value.strip()
    emotion = record.get("initial_emotion")   # absent: the protocol's start (RLVER training 30, SAGE 40)
    if isinstance(emotion, float) and emotion.is_integer():
        emotion = int(emotion)
    if emotion is not None and (isinstance(emotion, bool) or not isinstance(emotion, int) or not 1 <= emotion <= 99):
        raise ProfileError(f"{where}: initial_emotion must be an integer in 1..99, got {emotion!r}")
    if public:
        group = record.get("cha_group") or []
        traits = ([record["main_cha"]] if record.get("main_cha") else []) + \
                 (list(group) if isinstance(group, list) else [group])
    else:
        traits = list(record.get("traits") or [])
    return Profile(id=str(record.get("id", default_id)), initial_emotion=emotion,
                   traits=[str(t) for t in traits], **fields)


def load_profiles(path):
    """Read a JSONL profile file (one profile per line, blank lines skipped) into a list of Profiles."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile file not found: {path}")
    profiles, lines_of = [], {}   # lines_of: profile id -> the line that defined it
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text (byte {e.start}): re-save the file as UTF-8") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        profiles.append(_profile_from_record(record, where, default_id=f"{path.stem}-{lineno}"))
        pid = profiles[-1].id   # ids key the eval table, transcripts and the leaderboard: one profile each
        if pid in lines_of:
            raise ProfileError(f"{path}: lines {lines_of[pid]} and {lineno} both have profile id {pid!r}: give "
                               f"every profile its own id")
        lines_of[pid] = lineno
    if not profiles:
        raise ProfileError(f"{path}: no profiles in file")
    return profiles


def builtin_profiles(split="train"):
    """Our own English profile sets: 'train' (105 profiles) or 'test' (32 profiles)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown profile split {split!r}: use 'train' or 'test'")
    return load_profiles(PROMPTS_DIR / f"profiles_{split}.jsonl")


# ----------------------------------------------------------------------------------------------------
# 2. Protocols and episodes. A protocol is the whole rule set of one dialogue game; this table is its only
# definition (rollout.py, benchmark.py and rlver.py just name one).
#
#   classic  ours: start 50, change clamped to +-30, ends at 0 / 100 / max turns, one call per user turn
#   rlver    RLVER's training simulator (hard_player_simulator_dsv3.py): start 30, no clamp on the change,
#            ends on a goodbye word or emotion <= 0 (no stop at 100), up to 9 scored policy replies
#            (official max_turns=8 counts rounds after the first), two calls per user turn
#   sage     SAGE's test_npc.py loop: start 40, change clamped to +-10, ends on a goodbye word (checked
#            first), emotion >= 100 (success) or < 10 (failure); the user opens with first_talk, the agent
#            replies at most 10 times of which at most 9 are scored: the 10th reply is never shown to the
#            simulator and cannot change any number, so we stop after the 9th scored reply. Two calls.
# In every protocol the code caps emotion at 100 and floors it at 0. RLVER lets it go negative but floors the
# reward at 0 and stops at <= 0, and SAGE stops below 10 with changes of at most 10, so the floor changes no
# reward, score or ending.

@dataclass(frozen=True)
class Protocol:
    name: str
    initial_emotion: int   # start for a profile without its own initial_emotion
    max_change: int        # a change is clamped to [-max_change, max_change]; None: no clamp
    success_at: int        # emotion >= success_at ends the dialogue as "success"; None: never stops there
    failure_below: int     # emotion < failure_below ends it as "failure"
    goodbye: tuple         # substrings of the user's reply that end it ("goodbye"), checked first
    max_turns: int         # scored policy replies by default (a turn = one policy reply + its evaluation)
    stages: int            # 1: one call writes thought + change + reply; 2: analysis -> change, then reply


GOODBYE_ZH = ("再见", "拜拜")   # SAGE / RLVER end a dialogue when the user's reply contains one of these
PROTOCOLS = {
    "classic": Protocol("classic", 50, 30, 100, 1, (), 8, 1),
    "rlver": Protocol("rlver", 30, None, None, 1, GOODBYE_ZH, 9, 2),
    "sage": Protocol("sage", 40, 10, 100, 10, GOODBYE_ZH, 9, 2),
}


def protocol_of(name):
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def detect_lang(profile):
    """'zh' when the profile text is mostly Chinese (the public RLVER/SAGE data), else 'en'."""
    text = profile.persona + profile.scenario + profile.hidden_intention + profile.opening
    cjk = sum("\u3400" <= ch <= "\u9fff" for ch in text)
    letters = sum(ch.isascii() and ch.isalpha() for ch in text)
    return "zh" if cjk > letters / 4 else "en"


def band(emotion):
    """SAGE's coarse emotion band the reply stage sees instead of the number: S >= 100, A >= 70, B >= 40,
    C >= 10, else F."""
    return next(b for b, low in (("S", 100), ("A", 70), ("B", 40), ("C", 10), ("F", -10**9)) if emotion >= low)


@dataclass
class Episode:
    profile: Profile
    emotion: int              # current emotion in [0, 100]
    messages: list            # the dialogue from the AGENT's point of view (user/assistant roles, no system)
    turns: list               # per turn: {turn, agent, thought, change, emotion, user, parse_failed}
    done: bool = False
    end_reason: str = None    # dialogue_end's "success" / "failure" / "goodbye" / "max_turns", or "max_context"
    parse_failures: int = 0   # turns whose simulator output stayed unparseable after the retries
    truncated_replies: int = 0   # policy replies cut at the max-new-tokens cap (set by rollout.rollout)
    cut_thoughts: int = 0     # 1 when the policy's reply ended inside its <think> (the dialogue ended there)
    changes_out_of_range: int = 0   # unclamped changes (rlver) outside -100..100: the simulator misread its scale


def resolve_profile(profile, protocol=None, lang=None, initial_emotion=None):
    """The profile as played: its protocol, its language (forced, else detected), and its start emotion
    (the profile's own value, else initial_emotion, else the protocol's default)."""
    protocol = protocol or profile.protocol
    start = next(e for e in (profile.initial_emotion, initial_emotion, protocol_of(protocol).initial_emotion)
                 if e is not None)
    return replace(profile, protocol=protocol, lang=lang or profile.lang or detect_lang(profile),
                   initial_emotion=start)


def new_episode(profile):
    """The user speaks first: the dialogue starts with the profile's opening message (prepare_profiles
    writes one for a profile that has none)."""
    if not profile.opening:
        raise ValueError(f"profile {profile.id} has no opening line: run simulator.prepare_profiles first")
    profile = resolve_profile(profile)
    return Episode(profile=profile, emotion=profile.initial_emotion,
                   messages=[{"role": "user", "content": profile.opening}], turns=[])


def prepare_profiles(profiles, backend=None, *, protocol="classic", mode="vanilla", lang=None,
                     initial_emotion=None, retries=2, log=print):
    """The profiles as played under a protocol (resolve_profile), with an opening line written by the
    simulator for every profile without one: one batched request (build_opening_request), strict parse,
    retries; a canned line (with a warning) if it still fails. RLVER's trainer does the same: its
    training profiles have no first_talk and the simulator opens at the protocol's start emotion."""
    played = [resolve_profile(p, protocol, lang, initial_emotion) for p in profiles]
    todo = [i for i, p in enumerate(played) if not p.opening]
    if todo:
        if backend is None:
            raise ValueError("profiles without an opening line need a simulator backend to write one")
        parse = parse_official_reply if played[todo[0]].prompts else parse_reply_output
        asks = [ask(Request(build_opening_request(played[i], mode), "opening", mode, played[i].lang,
                            official=bool(played[i].prompts)), parse, retries) for i in todo]
        for i, (opening, error) in zip(todo, play_turns(backend, asks, log=log)):
            if opening is None:
                log(f"WARNING: the simulator could not write an opening for profile {played[i].id} "
                    f"({error}); using a fallback line")
            opening = opening or FALLBACK_OPENING[played[i].lang]
            played[i] = replace(played[i], opening=opening, opening_written=True)
    return played


def final_outcome(emotion, protocol="classic"):
    """How a finished dialogue counts in the scores, from its final emotion alone (SAGE's Success = final
    emotion >= 100, Failure = final emotion below the failure line, whatever ended the dialogue)."""
    P = protocol_of(protocol)
    if emotion < P.failure_below:
        return "failure"
    if emotion >= 100:
        return "success"
    return None


def reward(episode):
    """RLVER's verifiable reward: final emotion / 100, in [0, 1]."""
    return episode.emotion / 100


def visible_reply(text):
    """What the user gets to see of a policy message (the one owner of this rule). A think-then-say policy
    writes <think>...</think> first and only the text after </think> reaches the user; an unclosed <think>
    means the policy never got to its reply, so the user sees nothing. (Applied in every template mode: a
    thought never reaches the user.)"""
    text = (text or "").strip()
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    if "<think>" in text:
        return ""
    return text


def thought_cut(text):
    """A think-then-say message cut before </think> (at the reply cap): there is no reply to show. The
    dialogue ends there (simulate_turn, end_reason "thought_cut", the reward the emotion reached so far)
    rather than showing the user an empty message, and it is counted (Episode.cut_thoughts)."""
    return "<think>" in (text or "") and "</think>" not in text


COUNTS = ("truncated_replies", "cut_thoughts", "changes_out_of_range")   # per-episode counts worth a warning


def count_warnings(counts, where):
    """Warning lines for the COUNTS of a batch of episodes ({name: total}); trainer and eval print them."""
    why = {"truncated_replies": "policy replies were cut at --max-new-tokens (raise it: the user read a cut reply)",
           "cut_thoughts": "dialogues ended because a --think reply was cut before </think> (raise "
                           "--max-new-tokens)",
           "changes_out_of_range": "simulator changes were outside -100..100 (applied unclamped, as RLVER's "
                                   "trainer does): the simulator misreads its scale"}
    return [f"warning: {where}: {counts[k]:g} {why[k]}" for k in COUNTS if counts.get(k)]


def dialogue_end(emotion, turns, max_turns, user_text="", protocol="classic"):
    """How a dialogue ends (the one owner of this rule): None while it goes on. In the protocol's order
    (SAGE test_npc.py): a goodbye word in the user's reply ("goodbye"); emotion below the failure line, the
    user gives up and leaves ("failure"); emotion at the success line, the user feels fully supported
    ("success"); else after max_turns scored replies."""
    P = protocol_of(protocol)
    if any(word in (user_text or "") for word in P.goodbye):
        return "goodbye"
    if emotion < P.failure_below:
        return "failure"
    if P.success_at is not None and emotion >= P.success_at:
        return "success"
    if turns >= max_turns:
        return "max_turns"
    return None


def parse_failure_stats(episodes):
    """(turns whose simulator answer stayed unparseable, all simulator turns, the first such turn's note or
    None). Trainer and benchmark stop on a high share: such turns are scored change 0, not judged."""
    failed = [t for ep in episodes for t in ep.turns if t.get("parse_failed")]
    return len(failed), sum(len(ep.turns) for ep in episodes), (failed[0]["thought"] if failed else None)


def check_parse_failures(failed, total, example, max_rate, where, warn=None):
    """The one rule for unparseable simulator answers (scored change 0: judged by nobody). A few are noise;
    past `max_rate` of the turns the simulator plainly ignores its format and a score or a gradient would
    measure nothing, so this raises SimulatorError naming the share and the fix. warn(line), if given, gets
    one offending answer (the trainer shows it once per run)."""
    if failed and warn and example:
        warn(f"warning: {where}: {failed}/{total} simulator turns were unparseable (scored change 0, the policy "
             f"saw a fallback user line); e.g. {example[:300]}")
    if failed > max_rate * total:
        raise SimulatorError(f"{where}: {failed}/{total} simulator turns were unparseable (more than "
                             f"--max-parse-failure-rate {max_rate:g}): the simulator does not follow the output "
                             f"format of its protocol (see prompts/), so no score or update can rest on it; fix "
                             f"its model or prompt")


def transcript(episode, **extra):
    """One JSON record per dialogue, everything needed to read it back and to re-score it (the trainer's
    samples.jsonl and the evaluation's transcripts.jsonl). extra: e.g. step=, seed=, policy_texts=."""
    return {**extra, "profile_id": episode.profile.id, "initial_emotion": episode.profile.initial_emotion,
            "final_emotion": episode.emotion, "reward": reward(episode), "end_reason": episode.end_reason,
            "protocol": episode.profile.protocol, "lang": episode.profile.lang,
            "opening": episode.profile.opening, "opening_written": episode.profile.opening_written,
            "parse_failures": episode.parse_failures, **{k: getattr(episode, k) for k in COUNTS},
            "turns": [{k: t[k] for k in ("turn", "agent", "emotion", "change", "thought", "user")}
                      for t in episode.turns]}


# ----------------------------------------------------------------------------------------------------
# 3. Prompts: each turn the simulator gets [system: who you are + rules + format, user: the dialogue]

_PROMPT_CACHE = {}


def load_prompt(name, lang="en"):
    """Text of prompts/<name>, or of its Chinese version <stem>_zh.txt for lang 'zh' (cached)."""
    if lang == "zh":
        name = name[:-len(".txt")] + "_zh.txt"
    if name not in _PROMPT_CACHE:
        _PROMPT_CACHE[name] = (PROMPTS_DIR / name).read_text(encoding="utf-8")
    return _PROMPT_CACHE[name]


def _fill(template, **values):
    # plain replace, not str.format: profile text may contain braces
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def _system(profile, mode, one_call):
    """The mode template filled with the profile. The two-stage steps bring their own output format, so
    for them the template's one-call format section is cut off."""
    if mode not in MODES:
        raise ValueError(f"unknown simulator mode {mode!r}: use one of {', '.join(MODES)}")
    text = _fill(load_prompt(f"simulator_{mode}.txt", profile.lang), persona=profile.persona,
                 scenario=profile.scenario, traits=", ".join(profile.traits) or "(not specified)",
                 hidden_intention=profile.hidden_intention)
    if not one_call:
        for header in FORMAT_HEADERS:
            text = text.split(header)[0].rstrip() + "\n"
    return text


def _dialogue(episode):
    """The dialogue so far from the user's side, one "Speaker: text" line per message."""
    me, other = SPEAKERS[episode.profile.lang]
    lines = [f"{me}: {episode.profile.opening}"]
    for t in episode.turns:
        lines += [f"{other}: {t['agent'] or EMPTY_REPLY}", f"{me}: {t['user']}"]
    return "\n".join(lines)


def build_request(episode, agent_reply, mode="vanilla", step="turn"):
    """The chat request for one turn. The system message is the mode's template filled with the profile;
    the user message holds the dialogue so far (from the user's side), the agent's latest reply (only its
    visible part) and the current emotion. step 'turn': the one-call protocol (thought, change and reply at
    once); 'analysis': the first of the two-stage calls (thought and change only)."""
    if episode.profile.lang is None:   # an Episode built by hand, not by new_episode
        episode.profile = resolve_profile(episode.profile)
    if episode.profile.prompts:   # the authors' prompts (section 3b): two calls, so only the analysis comes here
        return build_official_analysis(episode, agent_reply)
    lang = episode.profile.lang
    template = {"turn": "simulator_turn.txt", "analysis": "simulator_analysis.txt"}[step]
    user = _fill(load_prompt(template, lang), dialogue=_dialogue(episode),
                 agent_reply=agent_reply or EMPTY_REPLY, emotion=episode.emotion)
    return [{"role": "system", "content": _system(episode.profile, mode, step == "turn")},
            {"role": "user", "content": user}]


def build_reply_request(episode, agent_reply, mode, analysis, emotion):
    """The second two-stage call (SAGE / RLVER): the user's reply, written from the first call's analysis
    and the coarse band of the emotion AFTER the code applied the change (never the number)."""
    if episode.profile.prompts:
        return build_official_reply(episode, agent_reply, analysis, emotion)
    user = _fill(load_prompt("simulator_reply.txt", episode.profile.lang), dialogue=_dialogue(episode),
                 agent_reply=agent_reply or EMPTY_REPLY, analysis=analysis, band=band(emotion))
    return [{"role": "system", "content": _system(episode.profile, mode, False)},
            {"role": "user", "content": user}]


def build_opening_request(profile, mode="vanilla"):
    """The simulator's own request for the user's first line (a profile without first_talk), written at the
    start emotion's band, as RLVER's trainer does."""
    if profile.prompts:
        return build_official_opening(profile)
    user = _fill(load_prompt("simulator_opening.txt", profile.lang), band=band(profile.initial_emotion))
    return [{"role": "system", "content": _system(profile, mode, False)}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------------
# 3b. The official prompts, read at run time from the user's own checkout of the authors' repository
# (--official-prompts DIR: the checkout root, or its SAGE/ or RLVER/ folder). None of their text is in this
# repository: we read it, fill it and parse the answers as their code does, so a score is comparable.
#
#   sage   SAGE/simulator_response.py: target_prompt (the purpose of the talk), planning_reply's template (the
#          analysis call) and player_reply's (the reply call); SAGE/npc_response.py: the agent's system prompt
#          (role_system); SAGE/profile/simulator_profile_withfirsttalk.jsonl: the 100 scenarios
#   rlver  RLVER/code/verl/workers/rollout/vllm_rollout/hard_player_simulator_dsv3.py: target_prompt["eq"] and
#          the same two templates (its analysis asks for a Reason section); system_prompt.py beside it: the
#          policy's think / no-think prompts (a --think run under sage takes the think prompt from there too)
# Python files are read with `ast`. RLVER's simulator file does not parse as a whole (a stub function is
# mis-indented), so the statements we need are cut from its text and each parsed alone (_python_nodes).
#
# Their protocol as their code plays it; each call is ONE user message (no system message):
#   analysis  {{emotion}} the number, {{simulator_role}} / {{player_type}} the profile's player,
#             {{simulator_scene}} / {{player_topic}} its scene, {{target}} the target text, {{dialog_history}}
#             json.dumps([{role: 你 | NPC, content}], ensure_ascii=False, indent=2) of the whole dialogue
#             (sage) or of all but its last two messages, which fill {{new_history}} (rlver)
#   parsed    '：' -> ':', '*' dropped; section H = text.split("H:")[-1].split("<next header>:\n")[0], stripped of
#             newlines and [ ] (rlver also folds blank lines); the change is the first signed integer of the
#             last section (Change); none: the call is asked again
#   reply     {{planning}} built from the analysis sections by their code's expression (read from their file),
#             {{emotion}} the band name Emotion-S/A/B/C/F after the change, {{dialog_history}} all but the last
#             two messages, {{new_history}} those two; the reply is the text after the last "Response:",
#             stripped of newlines, [ ] and quotes
#   opening   (a profile without first_talk) the reply template with their opening planning line and opening
#             history text, {{new_history}} empty, at the start emotion's band
# Their code against the paper: RLVER's trainer never stores the emotion back into the state its analysis
# reads, so every analysis sees the start emotion 30 (only the reply call's band is live); we send the live
# number unless --official-quirks. SAGE's planning_reply looks up a `target` key its profiles lack (its code
# would stop there); we send the intended target text.

RLVER_ROLLOUT = "code/verl/workers/rollout/vllm_rollout/"
OFFICIAL_SIMULATOR = {"sage": ("SAGE", "simulator_response.py"),
                      "rlver": ("RLVER", RLVER_ROLLOUT + "hard_player_simulator_dsv3.py")}
OFFICIAL_POLICY = {("sage", False): ("SAGE", "npc_response.py", "role_system"),   # (folder, file, variable)
                   ("sage", True): ("RLVER", RLVER_ROLLOUT + "system_prompt.py", "system_prompt_train_think"),
                   ("rlver", False): ("RLVER", RLVER_ROLLOUT + "system_prompt.py", "system_prompt_train_unthink"),
                   ("rlver", True): ("RLVER", RLVER_ROLLOUT + "system_prompt.py", "system_prompt_train_think")}
OFFICIAL_PROFILES = ("SAGE", "profile/simulator_profile_withfirsttalk.jsonl")   # eval's default under sage
OFFICIAL_ROLES = {"user": "你", "assistant": "NPC"}   # the speakers in their JSON history
# the statements of a file that does not parse as a whole: template literals, the target table, the
# {{planning}} / {{dialog_history}} replacements and the opening planning line (each starts a line)
_STATEMENTS = re.compile(r'^[ \t]*((?:template|role_system|system_prompt_train_\w+) = (?P<q>"""|\'\'\').*?(?P=q)'
                         r'|target_prompt = \{.*?^[ \t]*\}[ \t]*$'
                         r'|\S[^\n]*\.replace\("\{\{(?:planning|dialog_history)\}\}"[^\n]*|planning\[.analyse.\] = [^\n]*)',
                         re.MULTILINE | re.DOTALL)


@dataclass
class OfficialPrompts:
    source: str              # "SAGE" or "RLVER": whose simulator prompts
    target: str              # the purpose-of-the-talk text ({{target}})
    analysis: str            # the analysis call's template (planning_reply)
    reply: str               # the reply call's template (player_reply)
    headers: tuple           # the analysis sections in order, as its output format lists them; the change last
    planning: list           # how {{planning}} is built: [("text", s) | ("section", key)], from their code
    opening_planning: str    # {{planning}} of the opening request
    opening_history: str     # {{dialog_history}} of the opening request
    policy: str              # the policy's system prompt
    policy_source: str       # "file:variable" it came from
    files: dict              # every file read -> its sha256 (provenance)
    start_emotion_quirk: bool = False   # --official-quirks: RLVER's analysis sees the start emotion


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _python_nodes(path):
    """Every ast node of a Python file in source order; a file that does not parse as a whole is read
    statement by statement (_STATEMENTS), each parsed alone at its own line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"--official-prompts: cannot read {path} ({e.__class__.__name__}): point "
                           f"--official-prompts at a checkout of the authors' repository") from None
    try:
        trees = [ast.parse(text)]
    except SyntaxError:
        trees = []
        for m in _STATEMENTS.finditer(text):
            try:
                tree = ast.parse(m.group(1))
            except SyntaxError:
                continue
            trees.append(ast.increment_lineno(tree, text.count("\n", 0, m.start(1))))
    nodes = [n for tree in trees for n in ast.walk(tree) if hasattr(n, "lineno")]
    return sorted(nodes, key=lambda n: (n.lineno, n.col_offset))


def _assigned(nodes, name):
    """The literal values assigned to `name` (a variable, or a subscript key such as planning['analyse'])."""
    values = []
    for n in nodes:
        keys = [t.id if isinstance(t, ast.Name) else getattr(t.slice, "value", None)
                for t in getattr(n, "targets", []) if isinstance(t, (ast.Name, ast.Subscript))]
        if isinstance(n, ast.Assign) and name in keys:
            try:
                values.append(ast.literal_eval(n.value))
            except ValueError:
                pass   # not a literal (e.g. planning["analyse"] = reply.split(...))
    return values


def _replace_args(nodes, placeholder):
    """The second arguments of every `.replace(placeholder, X)` call, as ast nodes."""
    return [n.args[1] for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "replace" and len(n.args) == 2 and getattr(n.args[0], "value", None) == placeholder]


def _terms(node):
    """Their {{planning}} expression "..." + planning['key'] + ... -> [("text", s) | ("section", key)]."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _terms(node.left) + _terms(node.right)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [("text", node.value)]
    if isinstance(node, ast.Subscript) and isinstance(getattr(node.slice, "value", None), str):
        return [("section", node.slice.value)]
    raise ValueError(ast.dump(node)[:80])


def _first(values, path, what, kind=str):
    found = [v for v in values if isinstance(v, kind)]
    if not found:
        raise ProfileError(f"--official-prompts: {path} has no {what}: this checkout differs from the layout "
                           f"rlver reads (README, 'Official prompts'); use an unmodified checkout")
    return found[0]


def _need_placeholders(text, names, path, what):
    missing = [f"{{{{{n}}}}}" for n in names if f"{{{{{n}}}}}" not in text]
    if missing:
        raise ProfileError(f"--official-prompts: {path}: the {what} lacks {', '.join(missing)}: this checkout "
                           f"differs from the layout rlver reads; use an unmodified checkout")


def official_root(path):
    """--official-prompts DIR -> the checkout root (DIR itself, or the parent of its SAGE/ or RLVER/ folder)."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise ProfileError(f"--official-prompts {path}: not a folder; give your checkout of the authors' "
                           f"digitalhuman repository (or its SAGE/ or RLVER/ folder)")
    return path.parent if path.name in ("SAGE", "RLVER") else path


def load_official_prompts(path, protocol, think, quirks=False, simulator="an LLM"):
    """The authors' simulator and policy prompts for `protocol` (sage or rlver), read from the checkout at
    `path` (see the notes above). A file or template that is not where their layout has it raises
    ProfileError naming the file and what is missing. They are written for an LLM: never for the rules backend."""
    if simulator == "rules":
        raise ProfileError("--official-prompts needs an LLM simulator (--simulator URL or model folder): the rules "
                           "backend only reads our own templates")
    if protocol not in OFFICIAL_SIMULATOR:
        raise ProfileError(f"--official-prompts plays the authors' two-call simulator: use --protocol sage or "
                           f"rlver, not {protocol}")
    if quirks and protocol != "rlver":
        raise ProfileError("--official-quirks reproduces RLVER's trainer (its analysis always sees the start "
                           "emotion); SAGE has no such quirk: drop the flag or use --protocol rlver")
    root = official_root(path)
    folder, name = OFFICIAL_SIMULATOR[protocol]
    sim_path = root / folder / name
    nodes = _python_nodes(sim_path)
    templates = [t for t in _assigned(nodes, "template") if isinstance(t, str)]
    if len(templates) < 2:
        raise ProfileError(f"--official-prompts: {sim_path} has {len(templates)} template literal(s), expected "
                           f"two (the analysis and the reply): this checkout differs from the layout rlver reads")
    analysis, reply = templates[:2]
    target = _first(_assigned(nodes, "target_prompt"), sim_path, "target_prompt", (str, dict))
    if isinstance(target, dict):   # RLVER: a table by purpose; its trainer plays "eq" (heart-to-heart talk)
        target = _first([target.get("eq")], sim_path, 'target_prompt["eq"]')
    _need_placeholders(analysis, ("emotion", "dialog_history", "target"), sim_path, "analysis template")
    _need_placeholders(reply, ("emotion", "dialog_history", "new_history", "planning", "target"), sim_path,
                       "reply template")
    headers = tuple(re.findall(r"^(\w+):[ \t]*$", analysis, re.MULTILINE))
    if not headers or headers[-1] != "Change" or "Response:" not in reply:
        raise ProfileError(f"--official-prompts: {sim_path}: the analysis output format must end in 'Change:' and "
                           f"the reply's hold 'Response:': this checkout differs from the layout rlver reads")
    try:
        planning = _terms(_first(_replace_args(nodes, "{{planning}}"), sim_path,
                                 "{{planning}} expression over the analysis sections", ast.BinOp))
    except ValueError as e:
        raise ProfileError(f"--official-prompts: {sim_path}: unexpected term in the {{{{planning}}}} expression "
                           f"({e})") from None
    unknown = [k for kind, k in planning if kind == "section" and k.lower() not in map(str.lower, headers)]
    if unknown:
        raise ProfileError(f"--official-prompts: {sim_path}: {{{{planning}}}} reads section(s) {unknown} that "
                           f"the analysis format {list(headers)} lacks")
    opening_history = _first([getattr(a, "value", None) for a in _replace_args(nodes, "{{dialog_history}}")],
                             sim_path, "opening text for {{dialog_history}}")
    p_folder, p_name, variable = OFFICIAL_POLICY[protocol, bool(think)]
    policy_path = root / p_folder / p_name
    policy = _first(_assigned(_python_nodes(policy_path), variable), policy_path, variable)
    files = {str(p.relative_to(root)): _sha256(p) for p in (sim_path, policy_path)}
    return OfficialPrompts(folder, target, analysis, reply, headers, planning,
                           _first(_assigned(nodes, "analyse"), sim_path, "opening planning line"), opening_history,
                           policy, f"{p_folder}/{p_name}:{variable}", files, bool(quirks))


def official_profiles_path(path):
    """SAGE's scenario file in the checkout (eval's default profiles under --official-prompts, sage)."""
    p = official_root(path) / OFFICIAL_PROFILES[0] / OFFICIAL_PROFILES[1]
    if not p.is_file():
        raise ProfileError(f"--official-prompts: {p} not found: give --profiles, or a checkout that has SAGE's "
                           f"scenarios")
    return p


def _official_history(episode, agent_reply=None):
    """The dialogue as their JSON history: the user's opening, then the turns, then the latest agent reply."""
    messages = [("user", episode.profile.opening)]
    for t in episode.turns:
        messages += [("assistant", t["agent"]), ("user", t["user"])]
    if agent_reply is not None:
        messages.append(("assistant", agent_reply))
    return [{"role": OFFICIAL_ROLES[r], "content": c} for r, c in messages]


def _dump(messages):
    return json.dumps(messages, ensure_ascii=False, indent=2)


def _fill_official(template, values):
    """Their str.replace of {{name}} placeholders, in the given order (later values are never re-scanned for
    earlier names: the dialogue, filled last, may contain braces)."""
    for name, value in values:
        template = template.replace("{{" + name + "}}", str(value))
    return template


def _profile_values(prompts, profile):
    return [("target", prompts.target), ("simulator_role", profile.persona), ("player_type", profile.persona),
            ("simulator_scene", profile.scenario), ("player_topic", profile.scenario)]


def build_official_analysis(episode, agent_reply):
    """Their analysis call (planning_reply) as one user message."""
    prompts, history = episode.profile.prompts, _official_history(episode, agent_reply)
    emotion = episode.profile.initial_emotion if prompts.start_emotion_quirk else episode.emotion
    if prompts.source == "SAGE":   # the whole dialogue in one place
        recent = [("dialog_history", _dump(history))]
    else:                          # all but the last two messages, then those two
        recent = [("dialog_history", _dump(history[:-2])), ("new_history", _dump(history[-2:]))]
    text = _fill_official(prompts.analysis, [("emotion", emotion)] + _profile_values(prompts, episode.profile) + recent)
    return [{"role": "user", "content": text}]


def _official_reply_request(profile, planning, emotion, dialog_history, new_history):
    text = _fill_official(profile.prompts.reply, [("planning", planning), ("emotion", f"Emotion-{band(emotion)}")]
                          + _profile_values(profile.prompts, profile)
                          + [("dialog_history", dialog_history), ("new_history", new_history)])
    return [{"role": "user", "content": text}]


def build_official_reply(episode, agent_reply, planning, emotion):
    """Their reply call (player_reply): the planning text from the analysis, the band after the change."""
    history = _official_history(episode, agent_reply)
    return _official_reply_request(episode.profile, planning, emotion, _dump(history[:-2]), _dump(history[-2:]))


def build_official_opening(profile):
    """Their request for a first line (a profile without first_talk), at the start emotion's band."""
    p = profile.prompts
    return _official_reply_request(profile, p.opening_planning, profile.initial_emotion, p.opening_history, "")


def _text(text):
    """A simulator answer as text (every parser's first check): ParseError for anything else (a JSON null...)."""
    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}")
    return text


def parse_official_analysis(prompts, text):
    """Their analysis parse -> (the {{planning}} text built from the sections, the change as written)."""
    text = _text(text).replace("：", ":").replace("*", "")
    sections = {}
    for h, after in zip(prompts.headers, prompts.headers[1:] + (None,)):
        part = text.split(h + ":")[-1]
        part = (part.split(after + ":\n")[0] if after else part).strip("\n").strip("[").strip("]")
        sections[h.lower()] = part.replace("\n\n", "\n") if prompts.source == "RLVER" else part
    change = re.findall(r"[+-]?\d+", sections["change"])
    if not change:
        raise ParseError(f"no integer in the Change section: {sections['change'][:60]!r}")
    planning = "".join(v if kind == "text" else sections[v.lower()] for kind, v in prompts.planning)
    return planning, int(change[0])


def parse_official_reply(text):
    """Their reply parse: the text after the last 'Response:', stripped of newlines, [ ] and quotes."""
    return _text(text).split("Response:")[-1].strip("\n").strip("[").strip("]").strip("\u201c").strip("\u201d")


# ----------------------------------------------------------------------------------------------------
# 4. The output format. Strict, so the reward is verifiable:
#
#     <thought>
#     (i) how the reply changes my emotion ... (ii) how I feel now ... (iii) how I will answer ...
#     </thought>
#     <change>+6</change>
#     <reply>
#     what the user says next
#     </reply>
#
# Tolerated: whitespace anywhere, tag case (<Change>), a sign on the change ("+6", "- 3", "−3"), code fences
# around the whole answer, text before/after/between the sections, a leading <think>...</think> block
# (reasoning models), and a missing </reply> at the very end (truncated generation).
# Rejected (ParseError): a missing section, a change that is not a plain integer ("5.5", "five",
# "+5 points"), an empty reply. The change is then clamped to [-MAX_ABS_CHANGE, MAX_ABS_CHANGE].

_SECTION = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.IGNORECASE | re.DOTALL)
            for tag in ("thought", "change", "reply")}
_OPEN_REPLY = re.compile(r"<reply>(.*)\Z", re.IGNORECASE | re.DOTALL)   # truncated: no </reply>
_INTEGER = re.compile(r"[+-]?\s*\d+")


def _clean(text):
    """Our parsers' input: text (_text) without a leading <think> block and without code-fence lines."""
    text = re.sub(r"\A\s*<think>.*?</think>", "", _text(text), flags=re.IGNORECASE | re.DOTALL)
    return re.sub(r"^\s*```[\w-]*\s*$", "", text, flags=re.MULTILINE)


def parse_simulator_output(text):
    """Simulator text -> (thought: str, change: int, reply: str); raises ParseError naming the problem."""
    text = _clean(text)
    found = {tag: pattern.search(text) for tag, pattern in _SECTION.items()}
    if found["reply"] is None:
        found["reply"] = _OPEN_REPLY.search(text)
    missing = [f"<{tag}>" for tag, m in found.items() if m is None]
    if missing:
        raise ParseError(f"missing section(s) {', '.join(missing)}")
    thought, change, reply = (found[tag].group(1).strip() for tag in ("thought", "change", "reply"))
    change = change.replace("\u2212", "-")   # unicode minus
    if not _INTEGER.fullmatch(change):
        raise ParseError(f"<change> must be an integer, got {change[:40]!r}")
    if not reply:
        raise ParseError("empty <reply>")
    change = int(change.replace(" ", ""))
    return thought, max(-MAX_ABS_CHANGE, min(MAX_ABS_CHANGE, change)), reply


def parse_analysis_output(text):
    """Two-stage call 1 -> (thought, change); the change is NOT clamped here (the protocol clamps it).
    Same tolerances and rejections as parse_simulator_output; a <reply> is not needed."""
    text = _clean(text)
    found = {tag: _SECTION[tag].search(text) for tag in ("thought", "change")}
    missing = [f"<{tag}>" for tag, m in found.items() if m is None]
    if missing:
        raise ParseError(f"missing section(s) {', '.join(missing)}")
    thought, change = (found[tag].group(1).strip() for tag in ("thought", "change"))
    change = change.replace("\u2212", "-")
    if not _INTEGER.fullmatch(change):
        raise ParseError(f"<change> must be an integer, got {change[:40]!r}")
    return thought, int(change.replace(" ", ""))


def parse_reply_output(text):
    """Two-stage call 2 (and the opening request) -> the user's reply text: the <reply> section (a missing
    </reply> at the very end is tolerated); anything else in the output (a <thought> plan) is ignored."""
    text = _clean(text)
    found = _SECTION["reply"].search(text) or _OPEN_REPLY.search(text)
    if found is None:
        raise ParseError("missing section(s) <reply>")
    reply = found.group(1).strip()
    if not reply:
        raise ParseError("empty <reply>")
    return reply


def format_simulator_output(thought, change, reply):
    """The canonical form of the format above (what RulesBackend writes and an LLM is asked to write)."""
    return f"<thought>\n{thought}\n</thought>\n<change>{change:+d}</change>\n<reply>\n{reply}\n</reply>"


# ----------------------------------------------------------------------------------------------------
# 5. The turn loop. One dialogue's simulated turn is a generator (user_turn) that yields Requests and is sent
# their answers; Turns drives many over one backend (submit(request) -> Future) and alone waits on it.

POLL_S = 0.25   # how often a waiting Turns wakes up (Ctrl-C, the deadline, progress lines)


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


def _request(episode, messages, stage, mode, shown="", change=0):
    p = episode.profile
    return Request(messages, stage, mode, p.lang, p.hidden_intention, episode.emotion, shown, change, bool(p.prompts))


def settle(future, fn, *args):
    """future gets fn(*args) or its exception, unless it was cancelled meanwhile. Returns future."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
    return future


def completed(fn, *args):
    """A Future already holding fn(*args), or its exception: the answer of a backend that answers at once."""
    return settle(concurrent.futures.Future(), fn, *args)


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
    """The CODE applies the simulator's change (the verifiable part): clamp the change as the protocol says
    (SAGE: [-10, 10]), add it, cap at 100, floor at 0 (see the protocol notes)."""
    limit = protocol_of(protocol).max_change
    if limit is not None:
        change = max(-limit, min(limit, change))
    return change, max(0, min(100, emotion + change))


def user_turn(episode, agent_reply, mode="vanilla", max_turns=8, retries=2):
    """The simulated user's answer to one agent reply (a generator of Requests, see ask), in one call (thought,
    change, reply) or two (the analysis' thought and change; the code applies it; the reply from the analysis
    and the new band). The user sees visible_reply(agent_reply). A stage that fails `retries` re-asks counts as
    change 0 and/or a fallback reply (parse_failures). Returns the user's message, or None when the dialogue ends."""
    if episode.done:
        return None
    if thought_cut(agent_reply):   # no reply to show: the dialogue ends
        episode.messages.append({"role": "assistant", "content": agent_reply.strip()})
        episode.cut_thoughts, episode.done, episode.end_reason = 1, True, "thought_cut"
        return None
    shown, prompts = visible_reply(agent_reply), episode.profile.prompts   # prompts: the authors' (3b), or None
    if protocol_of(episode.profile.protocol).stages == 1:
        request = _request(episode, build_request(episode, shown, mode), "turn", mode, shown)
        parsed, error = yield from ask(request, parse_simulator_output, retries)
        analysis, user_reply, reply_error = parsed and parsed[:2], parsed and parsed[2], error
    else:
        parse = functools.partial(parse_official_analysis, prompts) if prompts else parse_analysis_output
        request = _request(episode, build_request(episode, shown, mode, step="analysis"), "analysis", mode, shown)
        analysis, error = yield from ask(request, parse, retries)
        thought, change = analysis or ("", 0)   # the reply stage sees the analysis and the band after the change
        messages = build_reply_request(episode, shown, mode, thought,
                                       apply_change(episode.emotion, change, episode.profile.protocol)[1])
        user_reply, reply_error = yield from ask(_request(episode, messages, "reply", mode, shown, change),
                                                 parse_official_reply if prompts else parse_reply_output, retries)
    return _record_turn(episode, agent_reply, shown, analysis, error, user_reply, reply_error, max_turns)


def _record_turn(episode, agent_reply, shown, analysis, error, user_reply, reply_error, max_turns):
    """The turn into the episode: the change applied by the code, the messages, the turn record, the end."""
    protocol = episode.profile.protocol
    failed = analysis is None or user_reply is None
    thought, change = analysis or (f"(unparseable simulator output: {error})", 0)
    if user_reply is None:   # (an empty reply that parsed stays empty, as SAGE keeps it)
        user_reply = FALLBACK_REPLY_ZH if episode.profile.lang == "zh" else FALLBACK_REPLY
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
    """The turns in flight over one backend, by key, each a generator (user_turn, ask). While collect() waits, a
    turn older than turn_deadline seconds (re-asks and stages included) raises SimulatorError, and a progress
    line goes to log every progress_every seconds."""

    def __init__(self, backend, turn_deadline=600.0, progress_every=15.0, log=None):
        self.backend, self.turn_deadline, self.progress_every, self.log = backend, turn_deadline, progress_every, log
        self.pending = {}     # key -> (turn, the future of its current request, when the turn began)
        self.ended = []       # (key, result) not yet collected
        self.asked = self.answered = 0

    def start(self, key, turn):
        self._send(key, turn, None, time.monotonic())

    def _send(self, key, turn, answer, began):
        try:
            request = turn.send(answer)
        except StopIteration as end:
            self.ended.append((key, end.value))
            return
        self.pending[key] = (turn, self.backend.submit(request), began)
        self.asked += 1

    def collect(self, wait):
        """[(key, result)] of the turns that ended; wait: block until one has (while any is in flight)."""
        last_line, role = time.monotonic(), self.backend.role
        while True:
            done = [(key, turn, future, began) for key, (turn, future, began) in self.pending.items() if future.done()]
            for key, turn, future, began in done:
                del self.pending[key]
                self.answered += 1
                self._send(key, turn, future.result(), began)   # (a backend's error is raised here)
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
            concurrent.futures.wait(futures, min(POLL_S, self.turn_deadline - (now - began)), "FIRST_COMPLETED")

    def close(self):
        """Abandon the requests in flight (an error, Ctrl-C): a backend skips those it has not sent yet."""
        for _, future, _ in self.pending.values():
            future.cancel()
        self.pending.clear()


def play_turns(backend, turns, turn_deadline=600.0, progress_every=15.0, log=None):
    """Drive every turn generator to its end over `backend` (Turns). Returns their results, in order."""
    results, flight = [None] * len(turns), Turns(backend, turn_deadline, progress_every, log)
    try:
        for key, turn in enumerate(turns):
            flight.start(key, turn)
        while flight.pending or flight.ended:
            for key, result in flight.collect(wait=True):
                results[key] = result
    finally:
        flight.close()
    return results


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
        return completed(self.answer, request)


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


def _bucket(change, emotion):
    """Which kind of canned answer the rules user gives."""
    return ("leave" if emotion <= 0 else "helped" if emotion >= 100 else "much_worse" if change <= -5
            else "worse" if change < 0 else "flat" if change == 0 else "better" if change < 5 else "much_better")


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

    def _count(self, patterns, text):
        cap = self.table["per_cue_cap"]
        return sum(min(len(p.findall(text)), cap) for p in patterns)

    def needs_of(self, hidden_intention):
        """Names of the needs whose trigger words occur in a hidden intention."""
        text = hidden_intention.lower()
        return [name for name, (triggers, _) in self.needs.items() if any(t.search(text) for t in triggers)]

    def score(self, reply, hidden_intention, mode="vanilla"):
        """Emotion change for one agent reply, plus the counts that explain it."""
        rules = self.table["modes"][mode]
        text = reply.lower().replace("\u2019", "'")
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
        if request.stage == "reply":   # written from the analysis' change
            change, hits = request.change, None
        else:
            change, hits = self.score(request.reply, request.need, request.mode)
        emotion = max(0, min(100, request.emotion + change))
        bucket = _bucket(change, emotion)
        variants = self.table["replies" if request.lang == "en" else "replies_zh"][bucket]
        if request.stage == "reply":
            return f"<reply>\n{variants[pick % len(variants)]}\n</reply>"
        # (i) why the emotion moved, (ii) how the user feels now, (iii) how it will answer
        touched = "it touched what I really need" if hits["need"] else "it missed what I really need"
        why = (f"(i) The reply had {hits['warmth']} warm or validating words, {hits['question']} question cues, "
               f"{hits['lecturing']} lecturing and {hits['dismissive']} dismissive cues, and {touched}; "
               f"my emotion changes by {change:+d}.")
        feeling = next(text for bound, text in self.table["feelings"] if emotion <= bound)
        thought = f"{why} (ii) I feel {feeling} ({emotion}/100). (iii) {self.table['plans'][bucket]}"
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
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)   # an HTTP date is GMT
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class OpenAIBackend(Backend):
    """concurrency: requests in flight; timeout: seconds per HTTP request (retried); max_retries: attempts after
    the first; role, unreachable_hint: word the errors (benchmark.py's policy endpoint)."""

    def __init__(self, url, model=None, api_key_env="OPENAI_API_KEY", concurrency=16, timeout=120.0,
                 max_retries=4, backoff=1.0, max_wait=60.0, temperature=0.7, max_tokens=1024, role="simulator",
                 unreachable_hint="start the server or pass --simulator rules"):
        self.role, self.unreachable_hint = role, unreachable_hint
        if not re.match(r"https?://[^/]", url or ""):
            raise ValueError(f"{role} URL must start with http:// or https://, got {url!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or min(backoff, max_wait) < 0:
            raise ValueError(f"{role} client needs concurrency >= 1, max_retries >= 0, timeout > 0, backoff and "
                             f"max_wait >= 0")
        url = url.rstrip("/")
        if url.endswith("/chat/completions"):
            url = url[: -len("/chat/completions")]
        elif url.count("/") == 2:          # bare "http://host:port": assume the usual /v1 prefix
            url += "/v1"
        self.base, self.url, self.where = url, url + "/chat/completions", f"{role} endpoint {url}/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_wait, self.temperature, self.max_tokens = backoff, max_wait, temperature, max_tokens
        self._api_key = os.environ.get(api_key_env) or None   # no key is fine for local servers
        self._todo, self._workers = queue.SimpleQueue(), []   # (future, messages) for the worker threads

    def __repr__(self):   # never shows the key
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text):
        text = str(text)
        return text.replace(self._api_key, "***") if self._api_key else text

    def _http(self, method, url, payload=None, timeout=None):
        """One HTTP exchange -> parsed JSON body. Errors propagate to the caller."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def check(self):
        """Fail fast, before any heavy work, if the endpoint is unreachable or rejects the key."""
        try:
            listing = self._http("GET", self.base + "/models", timeout=min(self.timeout, 10))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise SimulatorError(f"{self.role} endpoint {self.url} rejected the request (HTTP {e.code}); "
                                     f"put a valid API key in ${self.api_key_env}") from None
            return                          # reachable; this server just has no /models route
        except (OSError, http.client.HTTPException) as e:   # URLError, refused, timeout, reset, DNS
            raise SimulatorError(f"cannot reach {self.role} endpoint {self.url}: "
                                 f"{self._redact(getattr(e, 'reason', e))}; "
                                 f"{self.unreachable_hint}") from None
        except ValueError:
            return                          # reachable, answered something that is not JSON
        if self.model is None:
            with contextlib.suppress(KeyError, IndexError, TypeError):
                self.model = listing["data"][0]["id"]

    def submit(self, request):
        if self.model is None:   # check() asks the server which model it serves (vLLM needs the name)
            self.check()
            self.model = self.model or "default"
        future = concurrent.futures.Future()
        self._todo.put((future, request.messages))
        while len(self._workers) < self.concurrency:
            self._workers.append(threading.Thread(target=self._work, name=f"{self.role}-http", daemon=True))
            self._workers[-1].start()
        return future

    def _work(self):   # a worker thread: the next request, for the backend's whole life
        while True:
            future, messages = self._todo.get()
            if not future.cancelled():
                settle(future, self._complete, messages, future)

    def _complete(self, messages, future):
        """One chat request -> completion text, with retries. Returns None early once `future` is cancelled."""
        payload = {"model": self.model, "messages": messages,
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        last_error, wait = None, 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(wait)
                if future.cancelled():
                    return None
            retry_after = None
            try:
                answer = self._http("POST", self.url, payload)
                return answer["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                try:
                    body = e.read()[:300].decode("utf-8", errors="replace")
                except Exception:
                    body = ""
                last_error = f"HTTP {e.code} {body}".strip()
                if e.code < 500 and e.code not in (408, 429):   # not busy or broken: our mistake, no retry
                    hint = f"; check the API key in ${self.api_key_env}" if e.code in (401, 403) else ""
                    raise SimulatorError(f"{self.role} endpoint {self.url} refused the request "
                                         f"({self._redact(last_error)}){hint}") from None
                retry_after = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            except (OSError, http.client.HTTPException) as e:       # timeout, refused, reset
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:   # 200 with a body we cannot read
                last_error = f"malformed response: {e!r}"
            wait = min(self.max_wait, self.backoff * 2 ** attempt if retry_after is None else retry_after)
        raise SimulatorError(f"{self.role} endpoint {self.url} failed after {self.max_retries + 1} attempts: "
                             f"{self._redact(last_error)}")


# 6c. LocalModelBackend: an LLM simulator in this process. One daemon worker answers every request pending at
# that moment (up to batch_size) in one model.generate call with its own seeded generator (which requests share
# a batch depends on timing, so at temperature > 0 an answer does too).

class LocalModelBackend(Backend):
    where = "the local simulator model"

    def __init__(self, model, tokenizer, max_new_tokens=512, temperature=0.7, top_p=1.0, seed=0, batch_size=16):
        import torch
        from model import stop_token_ids
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
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
            texts = completed(self.generate, [m for _, m in batch])   # (an error goes to every request)
            for k, (future, _) in enumerate(batch):
                settle(future, lambda: texts.result()[k])

    def generate(self, requests):
        """Completion texts for chat requests (lists of messages), in one generate call."""
        import torch
        from model import generate
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(
                       messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False) for messages in requests]
        with torch.no_grad():
            new_ids, _ = generate(self.model, prompts, self.max_new_tokens, self.eos_ids, temperature=self.temperature,
                                  top_p=self.top_p, generator=self.generator)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def make_backend(spec, *, model_name=None, api_key_env="OPENAI_API_KEY", device="cpu", **kwargs):
    """6d. From a CLI string: 'rules' -> RulesBackend; 'http(s)://...' -> OpenAIBackend; a local model folder ->
    LocalModelBackend. Extra keyword arguments go to the backend's constructor."""
    spec = str(spec)
    if spec == "rules":
        return RulesBackend(**kwargs)
    if re.match(r"https?://", spec):
        return OpenAIBackend(spec, model=model_name, api_key_env=api_key_env, **kwargs)
    if Path(spec).is_dir():
        from model import load_model, load_tokenizer
        return LocalModelBackend(load_model(spec, device=device), load_tokenizer(spec), **kwargs)
    raise ValueError(f"unknown simulator {spec!r}: use 'rules', an http(s):// URL of an OpenAI-compatible "
                     f"server, or a local model folder")
