"""The multi-turn engine: a policy talks with simulated users until each dialogue ends.

RLVER's environment is a conversation (arXiv 2507.03112, sec. 3): the policy replies, the simulated user
(simulator.py) moves its emotion and answers, for up to max_turns turns. Two loops play it:
  rollout           token level, for a model in this process (training, local evaluation): every turn's ids
                    are carried exactly as sampled (the reply: policy_mask True; the template around the
                    user's answer: False), never re-tokenised; each dialogue keeps its KV cache across turns
                    and decodes in a continuous batch while others wait on the simulator (Engine)
  endpoint_rollout  text level, for a policy behind an OpenAI-compatible endpoint (benchmark.py eval)
Randomness: each dialogue samples from its own stream seeded by rollout_seed(run seed, step, dialogue index)
(a torch.Generator on CPU, model.keyed_uniform keys on CUDA), so its tokens never depend on the batch, the
rank or a resume (exactly in fp32; bf16 kernels may round a row differently in another batch shape).
"""

import bisect
import time
from dataclasses import dataclass, field

import torch

import model as lm
import simulator as sim

# ----------------------------------------------------------------------------------------------------------
# The policy's prompt


def system_prompt(think, lang="en", official=None):
    """The policy's system prompt: plain or think-then-say, in `lang`; or the authors' (simulator.OfficialPrompts)."""
    if official:
        return official.policy
    return sim.load_prompt("policy_system_think.txt" if think else "policy_system.txt", lang).strip()


def policy_messages(episode, think):
    """The chat the policy answers: its system prompt, then the dialogue from the agent's side."""
    return [{"role": "system", "content": system_prompt(think, episode.profile.lang, episode.profile.prompts)}] + \
        episode.messages


def render(tokenizer, messages, add_generation_prompt, think=None):
    """The chat template's text; think goes as `enable_thinking` (else a Qwen3 model thinks in --no-think runs)."""
    kwargs = {} if think is None else {"enable_thinking": think}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def user_turn_ids(tokenizer, user_text, stop_text=None, think=None):
    """The template ids that close the policy's turn and add the user's message, up to the next reply (ChatML:
    "<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n"): the text after a marker
    rendered as the last assistant message, so any template works. stop_text: the turn's stop token, not added
    twice when the template closes the turn with it (after Qwen2.5's <|endoftext|>, <|im_end|> still follows)."""
    marker = "\u2063RLVER\u2063"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": marker}, {"role": "user", "content": user_text}]
    text = render(tokenizer, messages, add_generation_prompt=True, think=think)
    delta = text[text.rindex(marker) + len(marker):]
    delta = delta.removeprefix(stop_text) if stop_text else delta
    return tokenizer.encode(delta, add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------
# Token-level rollout: the engine
#
# Each dialogue owns a slot of one model.KVCache (S = max_context) holding the first `length` ids of d.context.
# Under strip a slot rolls back to the turn's start and prefills only the turn's visible part (the ids after
# </think>) before the user's answer: each later turn's context is exactly what that turn's training sample holds.


@dataclass
class Sample:
    """One training sequence: ids (its context, then its sampled ids), policy_mask True on the sampled ids."""
    ids: list
    policy_mask: list
    dialogue: int  # index of its dialogue in the rollout (its reward and advantage come from there)


@dataclass
class Dialogue:
    episode: sim.Episode  # the simulator's side: emotion, per-turn trajectory, end reason
    ids: list  # every token of the conversation so far, exactly as the policy sampled it (thoughts kept)
    policy_mask: list  # True where the policy sampled the token (its <think> and reply tokens)
    generator: torch.Generator  # this dialogue's own random stream
    policy_texts: list = field(default_factory=list)  # full policy text per turn (think included)
    truncated: bool = False  # ended early by max_context
    context: list = None  # what the policy sees now: `ids` itself (keep), or ids with earlier thoughts cut (strip)
    samples: list = field(default_factory=list)  # training samples: one per dialogue (keep) or per turn (strip)
    reply: list = field(default_factory=list)  # ids sampled in the current turn
    length: int = 0  # ids of `context` in the dialogue's cache slot
    turn_start: int = 0  # len(context) when the current turn began


def rollout_seed(seed, step, index):
    """A distinct, reproducible random stream per (run seed, step, dialogue index)."""
    return (seed * 1_000_003 + step) * 100_003 + index


def start_dialogue(profile, tokenizer, think, seed, device, strip=False):
    episode = sim.new_episode(profile)
    ids = tokenizer.encode(render(tokenizer, policy_messages(episode, think), add_generation_prompt=True, think=think),
                           add_special_tokens=False)
    return Dialogue(episode=episode, ids=ids, policy_mask=[False] * len(ids), context=list(ids) if strip else ids,
                    generator=torch.Generator(device).manual_seed(seed))


def visible_ids(reply, tokenizer):
    """The ids of a turn that later turns keep under strip: those after the token completing the text's last
    "</think>" (none: all). Found in the text by bisection, never as an id run: byte-level BPE merges '>' with
    the newlines after it (Qwen2.5: "</think>\n\n" is [522, 26865, 1339])."""
    closing = tokenizer.decode(reply).count("</think>")
    if not closing:
        return reply
    # the shortest prefix that holds every "</think>" (a prefix's count only grows with its length)
    end = bisect.bisect_left(range(len(reply) + 1), closing, lo=1,
                             key=lambda n: tokenizer.decode(reply[:n]).count("</think>"))
    return reply[end:]


@dataclass
class EngineConfig:  # the engine's knobs: rollout's keyword arguments
    think: bool = True
    think_history: str = "keep"  # keep: thoughts stay, one sample per dialogue; strip: they leave, one per turn
    max_turns: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy (evaluation)
    top_p: float = 1.0
    mode: str = "vanilla"
    max_context: int = 4096
    eos_ids: list = None  # default: model.stop_token_ids
    kv_reuse: bool = True  # ablation off: re-prefill the whole context every turn
    overlap: bool = True  # ablation off: lockstep turns (every open dialogue decodes, then the simulator answers)
    compile: bool = False  # the decode step through torch.compile (model.compiled_decode)
    turn_deadline: float = 600.0  # seconds a dialogue's simulated turn may take (simulator.Turns)
    progress_every: float = 15.0  # seconds between progress lines while slow


TIMING = ("generate", "simulator", "tokens", "prefill_tokens", "decode_steps", "active_rows", "conversation_tokens")


class Engine:
    """One rollout's state; a slot goes ready (to prefill) -> generating -> held (reply done) -> at the simulator
    (self.turns) -> ready again, or finished. run() loops over the phases, each a method."""

    def __init__(self, model, tokenizer, backend, dialogues, cfg, timing, log=None):
        self.model, self.tokenizer, self.dialogues, self.cfg, self.timing = model, tokenizer, dialogues, cfg, timing
        self.eos, self.pad_id = set(cfg.eos_ids or lm.stop_token_ids(tokenizer)), tokenizer.pad_token_id
        self.log, self.device = log, model.inv_freq.device
        self.cache = lm.KVCache(model, len(dialogues), cfg.max_context)
        self.turns = sim.Turns(backend, cfg.turn_deadline, cfg.progress_every, log)
        self.generating, self.logits = [], None  # slots decoding now, and their next-token logits (b, V)
        self.held = []  # slots whose reply waits for the lockstep turn to end (overlap off)
        self.decode_step = None  # model.compiled_decode's step under compile, else None (eager)
        self.ready = [i for i in range(len(dialogues)) if self.begin_turn(i)]  # slots to prefill

    def begin_turn(self, i):
        """The dialogue starts a turn, or ends here when the turn could outgrow max_context."""
        d = self.dialogues[i]
        if len(d.context) + self.cfg.max_new_tokens > self.cfg.max_context:
            d.truncated = d.episode.done = True  # the reward is the emotion reached so far
            d.episode.end_reason = "max_context"
            return False
        if not self.cfg.kv_reuse:
            d.length = 0  # ablation: forget the cache, re-prefill the whole context
        d.turn_start, d.reply = len(d.context), []
        return True

    def end_turn(self, i):
        """The reply is complete: record it, and (strip) its training sample."""
        d = self.dialogues[i]
        d.policy_texts.append(self.tokenizer.decode(d.reply, skip_special_tokens=True))
        if self.cfg.think_history == "strip":
            d.samples.append(Sample(d.context[:d.turn_start] + d.reply,
                                    [False] * d.turn_start + [True] * len(d.reply), i))

    def carry(self, i, user_text):
        """The user's answer (None: the dialogue ended) closes the turn; returns whether a next turn begins."""
        d = self.dialogues[i]
        if user_text is None:
            return False
        stop_text = self.tokenizer.convert_ids_to_tokens(d.reply[-1]) if d.reply and d.reply[-1] in self.eos else None
        turn = user_turn_ids(self.tokenizer, user_text, stop_text, self.cfg.think)
        d.ids += turn
        d.policy_mask += [False] * len(turn)
        if self.cfg.think_history == "strip":  # roll the slot back to the turn's start; keep the visible part
            d.context[d.turn_start:] = visible_ids(d.reply, self.tokenizer) + turn
            d.length = min(d.length, d.turn_start)
        return self.begin_turn(i)

    def prefill_ready(self):
        """Each ready slot is fed only what is new since its last forward, then joins the decode batch."""
        ds = [self.dialogues[i] for i in self.ready]
        new_ids = [d.context[d.length:] for d in ds]
        logits = lm.prefill(self.model, self.cache, self.ready, new_ids, [d.length for d in ds], self.pad_id)
        for d, x in zip(ds, new_ids):
            d.length += len(x)
        self.timing["prefill_tokens"] += sum(map(len, new_ids))
        self.generating += self.ready
        self.ready = []
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def sample_and_decode(self):
        """Each generating slot samples a token (its own stream); a finished turn leaves (held), the rest decode."""
        ds = [self.dialogues[i] for i in self.generating]
        streams = [d.generator for d in ds]  # CPU: a draw per row from its generator
        if self.device.type == "cuda":  # a key per row, (its seed, len(ids): a new index at every draw); one launch
            streams = torch.tensor([[d.generator.initial_seed(), len(d.ids)] for d in ds], device=self.device)
        tokens, _ = lm.sample(self.logits, self.cfg.temperature, self.cfg.top_p, streams)
        going = []
        for r, (i, d, tok) in enumerate(zip(self.generating, ds, tokens.tolist())):
            d.reply.append(tok)
            d.ids.append(tok)
            d.policy_mask.append(True)
            if d.context is not d.ids:
                d.context.append(tok)
            if tok in self.eos or len(d.reply) == self.cfg.max_new_tokens:
                d.episode.truncated_replies += tok not in self.eos  # cut at the cap (counted, warned by callers)
                self.end_turn(i)
                self.held.append(i)
            else:
                going.append(r)
        self.timing["tokens"] += len(self.generating)
        self.generating, self.logits = [self.generating[r] for r in going], None
        if self.generating:  # decode: feed each continuing slot its sampled token
            lengths = {i: self.dialogues[i].length for i in self.generating}
            self.logits = lm.decode_one_token(self.model, self.cache, self.generating, tokens[going], lengths,
                                              self.pad_id, self.decode_step)
            for i in self.generating:
                self.dialogues[i].length += 1
            self.timing["decode_steps"] += 1
            self.timing["active_rows"] += len(self.generating)

    def hand_over(self):
        """Held replies go to the simulated users (lockstep: only once every reply of the turn ended)."""
        if self.cfg.overlap or not self.generating:
            for i in self.held:
                d = self.dialogues[i]
                self.turns.start(i, sim.user_turn(d.episode, d.policy_texts[-1], self.cfg.mode, self.cfg.max_turns))
            self.held = []

    def collect_answers(self):
        """Carry the answers that are back; wait for one when nothing can run (lockstep: for all of them)."""
        lockstep = not self.cfg.overlap and not self.generating
        while self.turns.pending or self.turns.ended:
            for i, user_text in self.turns.collect(wait=lockstep or not (self.generating or self.ready)):
                if self.carry(i, user_text):
                    self.ready.append(i)
            if not lockstep:
                return

    def run(self):
        """The phases in turn until every dialogue ended; a progress line every progress_every seconds."""
        started = last_line = time.time()
        try:  # one mixed-precision region for every eager forward (the compiled step turns it off)
            with lm.compute_region(self.model), lm.compiled_decode(self.model, self.cfg.compile) as self.decode_step:
                while self.generating or self.ready or self.held or self.turns.pending or self.turns.ended:
                    t0 = time.time()
                    if self.ready:
                        self.prefill_ready()
                    if self.generating:
                        self.sample_and_decode()
                    t1 = time.time()
                    self.collect_answers()  # (the answers to earlier hand-overs: a reply handed over now waits a step)
                    self.hand_over()
                    self.timing["generate"] += t1 - t0
                    self.timing["simulator"] += time.time() - t1
                    if self.log and time.time() - last_line > self.cfg.progress_every:
                        last_line, done = time.time(), sum(d.episode.done for d in self.dialogues)
                        self.log(f"  rollout: {done}/{len(self.dialogues)} dialogues done, {len(self.generating)} "
                                 f"generating, {self.timing['tokens']} tokens, {last_line - started:.0f}s")
        finally:
            self.turns.close()


@torch.no_grad()  # the rollout builds no autograd graph: its cache and logits carry no history
def rollout(model, tokenizer, profiles, backend, *, seeds, timing=None, log=None, **knobs):
    """Play one dialogue per profile to the end (Engine; knobs: EngineConfig's; seeds: rollout_seed, one each).
    timing (dict) gains TIMING: seconds generating / with the simulator, token, step and row counts."""
    cfg, timing = EngineConfig(**knobs), {} if timing is None else timing
    timing.update({key: timing.get(key, 0) for key in TIMING})
    dialogues = [start_dialogue(p, tokenizer, cfg.think, s, model.inv_freq.device, cfg.think_history == "strip")
                 for p, s in zip(profiles, seeds, strict=True)]
    Engine(model, tokenizer, backend, dialogues, cfg, timing, log).run()
    if cfg.think_history == "keep":  # one sample per dialogue (strip: one per turn, made as each turn ends)
        for i, d in enumerate(dialogues):
            d.samples = [Sample(d.ids, d.policy_mask, i)]
    timing["conversation_tokens"] += sum(len(d.ids) for d in dialogues)
    return dialogues


def training_samples(dialogues):
    """Every dialogue's training samples, in dialogue order (one per dialogue, or one per turn under strip)."""
    return [s for d in dialogues for s in d.samples]


def collate(dialogues, pad_id, device):
    """Right-pad .ids / .policy_mask (Dialogues or Samples): ids (B, T), loss mask (B, T-1) on targets ids[:, 1:]."""
    T = max(len(d.ids) for d in dialogues)
    ids = torch.full((len(dialogues), T), pad_id, dtype=torch.long)
    policy = torch.zeros(len(dialogues), T, dtype=torch.bool)
    for i, d in enumerate(dialogues):
        ids[i, :len(d.ids)] = torch.tensor(d.ids)
        policy[i, :len(d.ids)] = torch.tensor(d.policy_mask)
    return ids.to(device), policy[:, 1:].to(device)


# ----------------------------------------------------------------------------------------------------------
# Text-level rollout: a policy behind an OpenAI-compatible endpoint


def endpoint_rollout(policy_client, profiles, backend, *, think, mode="vanilla", max_turns=8, log=print,
                     turn_deadline=600.0, policy_turn_deadline=600.0, progress_every=15.0):
    """The same conversation for a policy behind HTTP: per turn every open dialogue's chat (policy_messages)
    goes to policy_client (a backend: simulator.OpenAIBackend(role="policy")), then simulate_turn answers
    the replies; each side's turn within its deadline (simulator.Turns). Returns the Episodes."""
    episodes, start = [sim.new_episode(p) for p in profiles], time.time()
    for turn in range(1, max_turns + 1):
        active = [ep for ep in episodes if not ep.done]
        if not active:
            break
        asks = [sim.ask(sim.Request(policy_messages(ep, think)), str, 0) for ep in active]
        texts = [text for text, _ in sim.play_turns(policy_client, asks, policy_turn_deadline, progress_every, log)]
        sim.simulate_turn(active, texts, backend, mode=mode, max_turns=max_turns, turn_deadline=turn_deadline,
                          progress_every=progress_every, log=log)
        log(f"  turn {turn}/{max_turns}: {len(active)} open dialogues, mean emotion "
            f"{sum(ep.emotion for ep in active) / len(active):.1f}, {time.time() - start:.1f}s")
    return episodes
