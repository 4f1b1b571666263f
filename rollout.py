"""
rollout.py: the multi-turn engine. A policy talks with simulated users until each dialogue ends.

RLVER's environment is a conversation, not a single prompt (Wang et al. 2025, arXiv 2507.03112, sec. 3):
the policy replies, the simulated user (simulator.py) reasons about the reply, moves its emotion and answers,
and so on for up to max_turns turns. Two loops play it:

  rollout           token level, for a model in this process (training and local evaluation). The ids of
                    every turn are carried exactly as sampled: the policy's reply ids (policy_mask True),
                    then the chat template's ids that close the turn and add the user's answer (False).
                    Nothing is re-tokenised, so training scores the very tokens that were sampled.
  endpoint_rollout  text level, for a policy behind an OpenAI-compatible endpoint (benchmark.py eval).

Both start from the same policy prompt (system_prompt + the user's opening line) and leave what the user
sees, how the emotion moves and when the dialogue ends to simulator.simulate_turn.

Randomness: every dialogue samples from its own torch.Generator seeded by rollout_seed(run seed, step,
dialogue index), so its tokens and reward never depend on the batch it shares, on the rank it runs on, or
on a resume.
"""

import time
from dataclasses import dataclass, field

import torch

import model as lm
import simulator as sim

# ----------------------------------------------------------------------------------------------------------
# The policy's prompt


def system_prompt(think, lang="en"):
    """The policy's system prompt: plain, or think-then-say (<think>...</think> first, then the reply), in the
    dialogue's language."""
    return sim.load_prompt("policy_system_think.txt" if think else "policy_system.txt", lang).strip()


def policy_messages(episode, think):
    """The chat the policy answers: its system prompt, then the dialogue from the agent's side."""
    return [{"role": "system", "content": system_prompt(think, episode.profile.lang)}] + episode.messages


def render(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def user_turn_ids(tokenizer, user_text, stop_text=None):
    """
    The template tokens that close the policy's turn and add the user's next message, ready for the
    policy's next reply: for ChatML "<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n".
    Found generically by rendering a conversation with a marker as the last assistant message and taking
    the text after it, so any chat template works. stop_text: the stop token the policy's turn ended with,
    if any; when the template's turn-closing text is that very token it is already in the sequence and is
    not added twice (Qwen2.5 may also stop on <|endoftext|>, after which <|im_end|> is still needed).
    """
    marker = "\u2063RLVER\u2063"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": marker}, {"role": "user", "content": user_text}]
    text = render(tokenizer, messages, add_generation_prompt=True)
    delta = text[text.rindex(marker) + len(marker):]
    if stop_text and delta.startswith(stop_text):
        delta = delta[len(stop_text):]
    return tokenizer.encode(delta, add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------
# Token-level rollout


@dataclass
class Dialogue:
    episode: sim.Episode  # the simulator's side: emotion, per-turn trajectory, end reason
    ids: list  # every token of the conversation so far, exactly as the policy saw and sampled it
    policy_mask: list  # True where the policy sampled the token (its <think> and reply tokens)
    generator: torch.Generator  # this dialogue's own random stream
    policy_texts: list = field(default_factory=list)  # full policy text per turn (think included)
    truncated: bool = False  # ended early by max_context


def rollout_seed(seed, step, index):
    """A distinct, reproducible random stream per (run seed, step, dialogue index)."""
    return (seed * 1_000_003 + step) * 100_003 + index


def start_dialogue(profile, tokenizer, think, seed, device):
    episode = sim.new_episode(profile)
    ids = tokenizer.encode(render(tokenizer, policy_messages(episode, think), add_generation_prompt=True),
                           add_special_tokens=False)
    return Dialogue(episode=episode, ids=ids, policy_mask=[False] * len(ids),
                    generator=torch.Generator(device).manual_seed(seed))


def rollout(model, tokenizer, profiles, backend, *, seeds, think=True, max_turns=8, max_new_tokens=256,
            temperature=1.0, top_p=1.0, mode="vanilla", max_context=4096, eos_ids=None, timing=None, log=None,
            slow_turn_s=10.0):
    """
    Run one dialogue per profile to the end, all in lockstep. Each turn:
      policy:    generate a reply for every open dialogue at once (prefill the whole conversation, decode)
      simulator: one batched request; it updates each user's emotion and answers (or ends the dialogue)
      carry:     append the sampled ids (policy_mask True) and the template ids of the user's answer (False)
    seeds: one random seed per dialogue (rollout_seed). temperature 0 decodes greedily (evaluation).
    log: called with a progress line after each turn that took longer than slow_turn_s seconds (real
    models), silent for quick turns. Returns the list of Dialogues.
    """
    timing = timing if timing is not None else {}
    eos_ids = eos_ids or lm.stop_token_ids(tokenizer)
    device = model.inv_freq.device
    dialogues = [start_dialogue(p, tokenizer, think, s, device) for p, s in zip(profiles, seeds, strict=True)]
    for turn_number in range(1, max_turns + 1):
        for d in dialogues:
            if not d.episode.done and len(d.ids) + max_new_tokens > max_context:
                d.truncated = d.episode.done = True  # the reward is the emotion reached so far
                d.episode.end_reason = "max_context"
        active = [d for d in dialogues if not d.episode.done]
        if not active:
            break
        t0 = turn_start = time.time()
        new_ids, _ = lm.generate(model, [d.ids for d in active], max_new_tokens, eos_ids, temperature=temperature,
                                 top_p=top_p, generator=[d.generator for d in active], pad_id=tokenizer.pad_token_id)
        timing["generate"] = timing.get("generate", 0.0) + time.time() - t0
        timing["tokens"] = timing.get("tokens", 0) + sum(len(x) for x in new_ids)
        for d, ids in zip(active, new_ids):
            d.ids += ids
            d.policy_mask += [True] * len(ids)
            d.policy_texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        t0 = time.time()
        user_texts = sim.simulate_turn([d.episode for d in active], [d.policy_texts[-1] for d in active], backend,
                                       mode=mode, max_turns=max_turns)
        timing["simulator"] = timing.get("simulator", 0.0) + time.time() - t0
        if log and time.time() - turn_start > slow_turn_s:
            log(f"  turn {turn_number}/{max_turns}: {len(active)} open dialogues, {sum(map(len, new_ids))} tokens "
                f"generated, policy {t0 - turn_start:.1f}s, simulator {time.time() - t0:.1f}s")
        for d, ids, user_text in zip(active, new_ids, user_texts):
            if user_text is not None:  # None: the simulator ended this dialogue
                stop_text = tokenizer.convert_ids_to_tokens(ids[-1]) if ids and ids[-1] in eos_ids else None
                turn = user_turn_ids(tokenizer, user_text, stop_text)
                d.ids += turn
                d.policy_mask += [False] * len(turn)
    return dialogues


def collate(dialogues, pad_id, device):
    """Right-pad to (B, T). Returns ids (B, T) and the loss mask (B, T-1), aligned with the targets ids[:, 1:]."""
    T = max(len(d.ids) for d in dialogues)
    ids = torch.full((len(dialogues), T), pad_id, dtype=torch.long)
    policy = torch.zeros(len(dialogues), T, dtype=torch.bool)
    for i, d in enumerate(dialogues):
        ids[i, :len(d.ids)] = torch.tensor(d.ids)
        policy[i, :len(d.ids)] = torch.tensor(d.policy_mask)
    return ids.to(device), policy[:, 1:].to(device)


# ----------------------------------------------------------------------------------------------------------
# Text-level rollout: a policy behind an OpenAI-compatible endpoint


def endpoint_rollout(policy_client, profiles, backend, *, think, mode="vanilla", max_turns=8, log=print):
    """
    The same conversation for a policy we only reach over HTTP. Per turn: each open dialogue's chat
    (policy_messages) goes to the endpoint, all at once; simulator.simulate_turn scores the replies and
    writes the users' answers. policy_client(requests) -> texts, e.g. simulator.OpenAIBackend(role="policy").
    Returns the finished simulator.Episodes.
    """
    episodes = [sim.new_episode(p) for p in profiles]
    start = time.time()
    for turn in range(1, max_turns + 1):
        active = [ep for ep in episodes if not ep.done]
        if not active:
            break
        texts = policy_client([policy_messages(ep, think) for ep in active])  # one text per open dialogue
        sim.simulate_turn(active, texts, backend, mode=mode, max_turns=max_turns)
        mean_emotion = sum(ep.emotion for ep in active) / len(active)
        log(f"  turn {turn}/{max_turns}: {len(active)} open dialogues, mean emotion {mean_emotion:.1f}, "
            f"{time.time() - start:.1f}s")
    return episodes
