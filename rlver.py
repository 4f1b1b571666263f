"""
rlver.py: train an empathetic dialogue policy with RLVER (Wang et al. 2025, arXiv 2507.03112).

    python rlver.py                                   # CPU demo: tiny model + rules simulator, reward rises
    torchrun --nproc_per_node 8 rlver.py --algo grpo --model /models/Qwen2.5-7B-Instruct \
        --simulator http://localhost:8000/v1 --simulator-model Qwen2.5-72B-Instruct

One training step, read top to bottom in train_step():
  1. rollout     each rank talks with its share of simulated users, all dialogues in lockstep: the policy
                 answers every open dialogue at once (model.generate), the simulator answers every reply at
                 once (simulator.simulate_turn), finished dialogues drop out. The token ids of each turn
                 are appended as sampled; nothing is re-tokenised.
  2. reward      final emotion / 100, the "verifiable emotion reward" (simulator.reward).
  3. score       log-probs of the sampled tokens under the current (old) and the reference policy, and for
                 PPO the critic's values: teacher-forced, micro-batched.
  4. advantages  GRPO: reward against its group of rollouts of the same profile (grpo.group_advantages).
                 PPO: GAE over policy tokens with the critic as baseline (ppo.compute_gae), whitened.
  5. update      clipped surrogate losses, several epochs of micro-batches with gradient accumulation,
                 normalised by the global token count, grad clipping, AdamW.
Around it: torchrun + FSDP2 setup, checkpoints in the HF layout with trainer state (--resume), metrics.jsonl,
sample transcripts, periodic evaluation on the test profiles (benchmark.py).
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import grpo
import model as lm
import ppo
import simulator as sim

# ----------------------------------------------------------------------------------------------------------
# Config: every knob is a flag; the resolved config is written to <out>/config.json.


def get_args(argv=None):
    p = argparse.ArgumentParser(description="RLVER: RL with verifiable emotion rewards (PPO / GRPO).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--algo", choices=["grpo", "ppo"], default="grpo")
    a("--model", default=None, help="local HF checkpoint folder (qwen2/llama/qwen3), or a random-weight smoke run at a "
      f"real size: one of {', '.join(lm.SHAPES)} (made once in <out>/random-NAME); default: a tiny CPU demo model")
    a("--out", default="runs/rlver", help="output dir: config, metrics.jsonl, samples, checkpoints")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    # environment
    a("--simulator", default="rules", help="'rules', an OpenAI-compatible URL, or a local model folder")
    a("--simulator-model", default=None, help="model name sent to an OpenAI-compatible simulator endpoint")
    a("--simulator-key-env", default="OPENAI_API_KEY", help="env var holding the simulator endpoint's API key")
    a("--mode", choices=sim.MODES, default="vanilla", help="simulated-user environment: vanilla or challenging")
    a("--train-profiles", default=None, help="profile JSONL (ours or the public RLVER layout); default: built-in")
    a("--test-profiles", default=None, help="profile JSONL for periodic evaluation; default: built-in test set")
    a("--think", action=argparse.BooleanOptionalAction, default=True, help="think-then-say policy template")
    a("--max-turns", type=int, default=8)
    a("--max-new-tokens", type=int, default=256, help="per policy turn")
    a("--max-context", type=int, default=4096, help="a dialogue that would outgrow this many tokens ends early")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    # batch
    a("--steps", type=int, default=200)
    a("--profiles-per-step", type=int, default=32, help="global number of profiles per step")
    a("--group-size", type=int, default=None, help="rollouts per profile (default: 4 for grpo, 1 for ppo)")
    a("--micro-batch", type=int, default=4, help="dialogues per forward/backward")
    a("--mini-batches", type=int, default=1, help="optimizer steps per epoch")
    a("--epochs", type=int, default=1, help="passes over each step's rollouts")
    # optimisation
    a("--lr", type=float, default=1e-6)
    a("--critic-lr", type=float, default=1e-5)
    a("--warmup-steps", type=int, default=0)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--clip-low", type=float, default=0.2)
    a("--clip-high", type=float, default=0.2, help="> clip-low gives DAPO's clip-higher")
    a("--dual-clip", type=float, default=None, help="dual-clip constant c > 1 (e.g. 3); off by default")
    a("--value-clip", type=float, default=0.2)
    a("--kl-coef", type=float, default=1e-3, help="GRPO: k3 KL in the loss; PPO: k1 KL in the reward")
    a("--gamma", type=float, default=1.0)
    a("--lam", type=float, default=1.0)
    a("--no-std", action="store_true", help="GRPO without dividing by the group std (Dr.GRPO)")
    a("--loss-agg", choices=["token-mean", "seq-mean-token-mean"], default="token-mean")
    # system
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="compute dtype; auto = bf16 on GPU, fp32 on CPU. Parameters and AdamW state are fp32 either way")
    a("--no-fsdp", action="store_true", help="single process without FSDP (plain module)")
    a("--activation-checkpointing", action="store_true")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    a("--keep-checkpoints", type=int, default=2)
    a("--eval-every", type=int, default=0, help="evaluate on the test profiles every N steps (0: never)")
    a("--eval-profiles", type=int, default=32, help="test profiles per evaluation")
    a("--log-samples", type=int, default=2, help="transcripts written to samples.jsonl per step")
    args = p.parse_args(argv)
    if args.group_size is None:
        args.group_size = 4 if args.algo == "grpo" else 1
    return args


DEMO = dict(  # `python rlver.py` with no --model: everything small enough for a laptop CPU
    steps=30, profiles_per_step=8, max_turns=3, max_new_tokens=24, micro_batch=16, lr=1e-2, critic_lr=1e-2, warmup_steps=0,
    out="runs/demo", save_every=10, think=False, eval_every=15, eval_profiles=8)


class ConfigError(ValueError):
    """A bad flag or path: reported as one line before any heavy work."""


def apply_demo_defaults(args, argv):
    """With no --model we train a tiny random model (made on the spot) for a few minutes on CPU."""
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
    for key, value in DEMO.items():
        if key not in given and not (key == "think" and "no_think" in given):
            setattr(args, key, value)
    args.model = os.path.join(args.out, "tiny-qwen2")


def validate(args, world):
    """Everything a user can get wrong, checked in seconds before models are loaded."""
    if args.algo == "grpo" and args.group_size < 2:
        raise ConfigError("--group-size must be >= 2 for grpo (the baseline is the group's mean reward)")
    if args.profiles_per_step % world:
        raise ConfigError(f"--profiles-per-step {args.profiles_per_step} must be divisible by the number of "
                          f"processes ({world})")
    for flag in ("steps", "max_turns", "max_new_tokens", "micro_batch", "mini_batches", "epochs", "save_every"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    per_rank = args.profiles_per_step // world * args.group_size
    if per_rank % args.mini_batches:
        raise ConfigError(f"{per_rank} dialogues per process cannot be split into --mini-batches "
                          f"{args.mini_batches}")
    if args.temperature <= 0:
        raise ConfigError("--temperature must be > 0 for training (log-probs divide by it)")
    if args.max_context <= args.max_new_tokens:
        raise ConfigError("--max-context must exceed --max-new-tokens")
    cfg = lm.read_config(args.model)  # raises CheckpointError with the fix
    if args.no_fsdp and world > 1:
        raise ConfigError("--no-fsdp is for a single process; drop it under torchrun")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Distributed setup: one process per device (torchrun), FSDP2 shards parameters, grads and optimizer state.


def setup_distributed():
    """Join torchrun's process group (or make a group of one), pick the device. Returns rank, world, device."""
    if "RANK" not in os.environ:  # plain `python rlver.py`: a process group of one, same code path
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce(x, op=dist.ReduceOp.SUM):
    """All-reduce a float or tensor across ranks and return a python float / tensor."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    dist.all_reduce(t, op=op)
    return t.item() if t.dim() == 0 else t


def compute_dtype(args, device):
    """--dtype bfloat16, or auto on a GPU: bf16 compute. Only the compute: parameters are fp32 master weights."""
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def shard(module, blocks, device, args):
    """FSDP2: fully_shard each decoder block, then the root (embedding, final norm, head; a tied embedding
    and head stay in the root's unit together). bf16 compute: bf16 copies of the fp32 master weights are
    all-gathered for each forward/backward, gradients are reduced in fp32 into the fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if compute_dtype(args, device) == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def build_model(args, cfg, device, trainable, critic=False):
    """
    The policy, the frozen reference, or the PPO critic. Under FSDP it is built on the meta device (no
    memory), sharded, materialised on the device, then filled with the checkpoint: rank 0 reads the
    safetensors and set_model_state_dict broadcasts each rank its shard, so no rank holds a second full copy.
    Master weights: the parameters, and so AdamW's state, are fp32 on every path, whatever the checkpoint's
    dtype; with bf16 an update of lr 1e-6 would round away for most weights. bf16 compute comes from FSDP2's
    MixedPrecisionPolicy (shard()) or, for the plain module, torch.autocast inside its forward
    (model.Transformer.autocast_dtype), which covers generation, scoring and the update alike.
    """
    if args.no_fsdp:  # a plain module: load it directly (keeps a tied embedding/head tied)
        module = lm.load_model(args.model, device, torch.float32)
        if compute_dtype(args, device) != torch.float32:
            module.autocast_dtype = compute_dtype(args, device)
        if critic:
            torch.manual_seed(args.seed)
            module = ppo.Critic(module)
    else:
        module = build_sharded(args, cfg, device, torch.float32, critic)
    policy = module.backbone if critic else module
    policy.gradient_checkpointing = args.activation_checkpointing and trainable
    module.requires_grad_(trainable)
    return module if trainable else module.eval()


def build_sharded(args, cfg, device, dtype, critic):
    """Meta-device build, fully_shard, materialise, then rank 0's full state dict broadcast shard by shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        module = lm.Transformer(cfg)
        if critic:
            module = ppo.Critic(module)
    policy = module.backbone if critic else module
    shard(module, policy.model.layers, device, args)
    module.to_empty(device=device)
    state = lm.load_state_dict(args.model, dtype=dtype) if dist.get_rank() == 0 else {}
    if state and cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if critic:  # the value head is new: the Critic's own init, on a real device (rank 0's is broadcast)
        torch.manual_seed(args.seed)
        head = ppo.init_value_head(torch.nn.Linear(cfg.hidden_size, 1))
        if state:
            state = {f"backbone.{k}": v for k, v in state.items()}
            state.update({"value_head.weight": head.weight.data, "value_head.bias": head.bias.data})
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    policy.reset_rope(device)
    return module


class generation_mode:
    """
    Unshard the policy once for the whole rollout phase instead of all-gathering every layer for every
    decoded token. All ranks all-gather together on entry; after that a forward needs no collective, so
    ranks may run different numbers of decode steps (their dialogues end at different turns).
    """

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule

        self.model = model
        self.fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for m in self.fsdp_modules:
            m.unshard()  # (not recursive: every block and the root)
        if self.fsdp_modules:
            self.model.set_reshard_after_forward(False)
        self.model.eval()

    def __exit__(self, *exc):
        if self.fsdp_modules:
            self.model.set_reshard_after_forward(True)
        for m in self.fsdp_modules:
            m.reshard()
        self.model.train()


# ----------------------------------------------------------------------------------------------------------
# Rollouts: multi-turn dialogues between the policy and the simulated users, token ids carried forward.


@dataclass
class Dialogue:
    episode: sim.Episode  # the simulator's side: emotion, per-turn trajectory, end reason
    ids: list  # every token of the conversation so far, exactly as the policy saw and sampled it
    policy_mask: list  # True where the policy sampled the token (its <think> and reply tokens)
    generator: torch.Generator = None  # this dialogue's own random stream
    policy_texts: list = field(default_factory=list)  # full policy text per turn (think included)
    truncated: bool = False  # ended early by --max-context


def system_prompt(think):
    return sim.load_prompt("policy_system_think.txt" if think else "policy_system.txt").strip()


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


def start_dialogue(profile, tokenizer, think, generator=None):
    episode = sim.new_episode(profile)
    messages = [{"role": "system", "content": system_prompt(think)}] + episode.messages
    ids = tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)
    return Dialogue(episode=episode, ids=ids, policy_mask=[False] * len(ids), generator=generator)


def rollout(model, tokenizer, profiles, backend, *, think=True, max_turns=8, max_new_tokens=256, temperature=1.0,
            top_p=1.0, mode="vanilla", generator=None, seeds=None, max_context=4096, eos_ids=None, timing=None,
            log=None, slow_turn_s=10.0):
    """
    Run one dialogue per profile to the end, all in lockstep. Each turn:
      policy:    generate a reply for every open dialogue at once (prefill the whole conversation, decode)
      simulator: one batched request; it updates each user's emotion and answers (or ends the dialogue)
      carry:     append the sampled ids (policy_mask True) and the template ids of the user's answer (False)
    seeds: one random seed per dialogue (reproducible whatever the batch); else the shared `generator`.
    temperature 0 decodes greedily (evaluation). log: called with a progress line after each turn that took
    longer than slow_turn_s seconds (real models), silent for quick turns. Returns the list of Dialogues.
    """
    timing = timing if timing is not None else {}
    eos_ids = eos_ids or lm.stop_token_ids(tokenizer)
    device = model.inv_freq.device if hasattr(model, "inv_freq") else torch.device("cpu")
    gens = [torch.Generator(device).manual_seed(s) for s in seeds] if seeds is not None else [None] * len(profiles)
    dialogues = [start_dialogue(p, tokenizer, think, g) for p, g in zip(profiles, gens)]
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
                                 top_p=top_p, generator=[d.generator for d in active] if seeds is not None else generator,
                                 pad_id=tokenizer.pad_token_id)
        timing["generate"] = timing.get("generate", 0.0) + time.time() - t0
        timing["tokens"] = timing.get("tokens", 0) + sum(len(x) for x in new_ids)
        replies = []
        for d, ids in zip(active, new_ids):
            d.ids += ids
            d.policy_mask += [True] * len(ids)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            d.policy_texts.append(text)
            replies.append(sim.visible_reply(text) if think else text.strip())
        t0 = time.time()
        user_texts = sim.simulate_turn([d.episode for d in active], replies, backend, mode=mode, max_turns=max_turns)
        timing["simulator"] = timing.get("simulator", 0.0) + time.time() - t0
        if log and time.time() - turn_start > slow_turn_s:
            log(f"  turn {turn_number}/{max_turns}: {len(active)} open dialogues, {sum(map(len, new_ids))} tokens "
                f"generated, policy {t0 - turn_start:.1f}s, simulator {time.time() - t0:.1f}s")
        for d, ids, user_text in zip(active, new_ids, user_texts):
            if user_text is not None:  # None: the simulator ended this dialogue (emotion 0 or 100, or max turns)
                stop_text = tokenizer.convert_ids_to_tokens(ids[-1]) if ids and ids[-1] in eos_ids else None
                turn = user_turn_ids(tokenizer, user_text, stop_text)
                d.ids += turn
                d.policy_mask += [False] * len(turn)
    return dialogues


def rollout_seed(seed, step, index):
    """A distinct, reproducible random stream per (run seed, step, dialogue index)."""
    return (seed * 1_000_003 + step) * 100_003 + index


# ----------------------------------------------------------------------------------------------------------
# Scoring and update


def collate(dialogues, pad_id, device):
    """Right-pad to (B, T). Returns ids (B, T) and the loss mask (B, T-1), aligned with the targets ids[:, 1:]."""
    T = max(len(d.ids) for d in dialogues)
    ids = torch.full((len(dialogues), T), pad_id, dtype=torch.long)
    policy = torch.zeros(len(dialogues), T, dtype=torch.bool)
    for i, d in enumerate(dialogues):
        ids[i, :len(d.ids)] = torch.tensor(d.ids)
        policy[i, :len(d.ids)] = torch.tensor(d.policy_mask)
    return ids.to(device), policy[:, 1:].to(device)


def micro_batches(indices, size):
    """Split row indices into micro-batches; each is trimmed to its own longest row by the caller."""
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def trim(ids, rows, lengths):
    """ids[rows], cut to the longest of those rows: (b, T_rows)."""
    return ids[rows, :max(lengths[r] for r in rows)]


@torch.no_grad()
def score(model, ids, mask, lengths, args, values=False):
    """Teacher-forced log-probs (B, T-1) of every row under `model` (or the critic's values), micro-batched."""
    out = torch.zeros(mask.shape, device=mask.device)
    for rows in micro_batches(list(range(len(ids))), args.micro_batch):
        x = trim(ids, rows, lengths)
        y = model(x) if values else lm.token_logprobs(model, x, args.temperature)
        out[rows, :y.shape[1]] = y.float()
    return out


def global_whiten(x, mask, eps=1e-8):
    """ppo.masked_whiten with mean and variance over the valid tokens of ALL ranks (the global batch)."""
    m = mask.float()
    n, s = all_reduce(m.sum()), all_reduce((x * m).sum())
    mean = s / max(n, 1)
    var = all_reduce((((x - mean) * m) ** 2).sum()) / max(n - 1, 1)
    return (x - mean) / math.sqrt(var + eps) * m


def optimizer_step(model, optimizer, grad_clip):
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


SUMMED = ("loss", "policy_loss", "value_loss")  # micro-batch losses scaled by the global count (sum, not average)


def update(run, batch, args):
    """Several epochs of clipped-surrogate updates over this step's rollouts (and critic updates for PPO)."""
    ids, mask, lengths = batch["ids"], batch["mask"], batch["lengths"]
    world = dist.get_world_size()
    B = len(ids)
    stats = {}
    for epoch in range(args.epochs):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(args.seed + run["step"] * 7 + epoch)).tolist()
        per_mini = B // args.mini_batches
        for m in range(args.mini_batches):
            mini = order[m * per_mini:(m + 1) * per_mini]
            # Normalise by the GLOBAL count (every micro-batch on every rank) / world: FSDP averages gradients
            # over ranks, so the total gradient is that of sum(per-token loss) / N_global (see ppo.aggregate).
            n_tokens = all_reduce(mask[mini].sum()) / world
            n_seqs = all_reduce((mask[mini].sum(1) > 0).sum()) / world
            scale = dict(agg=args.loss_agg, loss_scale_tokens=n_tokens, loss_scale_seqs=n_seqs)
            for rows in micro_batches(mini, args.micro_batch):
                x, T = trim(ids, rows, lengths), max(lengths[r] for r in rows) - 1
                mb = {k: batch[k][rows, :T] for k in ("mask", "old_logprobs", "ref_logprobs", "advantages",
                                                      "old_values", "returns") if k in batch}
                logprobs, entropy = lm.token_logprobs(run["policy"], x, args.temperature, return_entropy=True)
                if args.algo == "grpo":
                    loss, metrics = grpo.grpo_loss(logprobs, mb["old_logprobs"], mb.get("ref_logprobs"),
                                                   mb["advantages"], mb["mask"], args.clip_low, args.clip_high,
                                                   args.kl_coef, dual_clip=args.dual_clip, **scale)
                else:
                    loss, metrics = ppo.policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                                    args.clip_low, args.clip_high, args.dual_clip, **scale)
                loss.backward()
                metrics["entropy"] = ppo.masked_mean(entropy.detach(), mb["mask"])
                if args.algo == "ppo":
                    values = run["critic"](x)
                    vloss, vmetrics = ppo.value_loss(values, mb["old_values"], mb["returns"], mb["mask"],
                                                     args.value_clip, **scale)
                    vloss.backward()
                    metrics.update(vmetrics)
                    metrics["loss"] = loss.detach()
                for k, v in metrics.items():  # token-weighted sums, averaged over the step below; the losses are
                    w = 1.0 if k in SUMMED else mb["mask"].sum().item()  # already / N_global: they just add up
                    stats[k] = stats.get(k, 0.0) + float(v) * w
                stats["_weight"] = stats.get("_weight", 0.0) + mb["mask"].sum().item()
                stats["loss_total"] = stats.get("loss_total", 0.0) + loss.item()
            stats["grad_norm"] = optimizer_step(run["policy"], run["optimizer"], args.grad_clip)
            if args.algo == "ppo":
                stats["critic_grad_norm"] = optimizer_step(run["critic"], run["critic_optimizer"], args.grad_clip)
    for sched in ("scheduler", "critic_scheduler"):
        if sched in run:
            run[sched].step()
    weight = all_reduce(stats.pop("_weight"))
    n_updates = args.epochs * args.mini_batches
    out = {k: all_reduce(v) / (world * n_updates if k in SUMMED else max(weight, 1)) for k, v in stats.items()
           if k not in ("grad_norm", "critic_grad_norm", "loss_total")}
    out["loss"] = all_reduce(stats["loss_total"]) / world / n_updates  # global loss, mean over optimizer steps
    for k in ("grad_norm", "critic_grad_norm"):
        if k in stats:
            out[k] = stats[k]
    return out


def train_step(run, args, profiles, backend, tokenizer, eos_ids, step):
    """One RLVER step: rollout -> reward -> score -> advantages -> update. Returns metrics and dialogues."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), run["device"]
    # 1. this step's profiles (an epoch-wise shuffle of the training set), this rank's contiguous share, each
    #    repeated group_size times so a whole group lives on one rank.
    P = args.profiles_per_step
    chosen = [(step * P + i) % len(profiles) for i in range(P)]
    epoch = step * P // len(profiles)
    perm = torch.randperm(len(profiles), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    share = P // world
    mine = chosen[rank * share:(rank + 1) * share]
    batch_profiles = [profiles[perm[i]] for i in mine for _ in range(args.group_size)]
    seeds = [rollout_seed(args.seed, step, rank * share * args.group_size + j) for j in range(len(batch_profiles))]

    timing, t0 = {}, time.time()
    with generation_mode(run["policy"]):
        dialogues = rollout(run["policy"], tokenizer, batch_profiles, backend, think=args.think,
                            max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, mode=args.mode, seeds=seeds,
                            max_context=args.max_context, eos_ids=eos_ids, timing=timing,
                            log=(lambda line: print(line, flush=True)) if rank == 0 else None)
    t_rollout = time.time() - t0

    # 2. rewards: final emotion / 100 (the verifiable emotion reward)
    t0 = time.time()
    rewards = torch.tensor([sim.reward(d.episode) for d in dialogues], device=device)  # (B,)
    ids, mask = collate(dialogues, tokenizer.pad_token_id, device)  # (B, T), (B, T-1)
    lengths = [len(d.ids) for d in dialogues]
    batch = {"ids": ids, "mask": mask, "lengths": lengths}

    # 3. score the rollouts: old log-probs (pi_old), reference log-probs, values
    batch["old_logprobs"] = score(run["policy"], ids, mask, lengths, args)
    if run.get("reference") is not None:
        batch["ref_logprobs"] = score(run["reference"], ids, mask, lengths, args)

    # 4. advantages
    if args.algo == "grpo":
        advantages = grpo.group_advantages(rewards, args.group_size, scale_by_std=not args.no_std)  # (B,)
        batch["advantages"] = advantages[:, None] * mask  # every token of a rollout shares its advantage
    else:
        batch["old_values"] = score(run["critic"], ids, mask, lengths, args, values=True)
        token_rewards = ppo.token_rewards(rewards, mask, batch["old_logprobs"], batch.get("ref_logprobs"),
                                          args.kl_coef if "ref_logprobs" in batch else 0.0)
        advantages, batch["returns"] = ppo.compute_gae(token_rewards, batch["old_values"], mask, args.gamma, args.lam)
        batch["advantages"] = global_whiten(advantages, mask)
    kl_to_ref = None
    if "ref_logprobs" in batch:  # k1 estimate of KL(pi_old || pi_ref) over the global batch's policy tokens
        kl_to_ref = all_reduce(((batch["old_logprobs"] - batch["ref_logprobs"]) * mask).sum()) / max(
            all_reduce(mask.sum()), 1)

    # 5. update
    metrics = update(run, batch, args)
    t_update = time.time() - t0
    if kl_to_ref is not None:
        metrics["kl_ref"] = kl_to_ref

    # metrics over the global batch
    episodes = [d.episode for d in dialogues]
    n = all_reduce(len(dialogues))
    mean = lambda xs: all_reduce(sum(xs)) / n
    reward_mean = mean([float(r) for r in rewards])
    metrics.update(
        step=step + 1, reward=reward_mean,
        reward_std=math.sqrt(max(mean([float(r) ** 2 for r in rewards]) - reward_mean ** 2, 0.0)),
        emotion=100 * reward_mean,
        success=mean([e.end_reason == "success" for e in episodes]),
        failure=mean([e.end_reason == "failure" for e in episodes]),
        turns=mean([len(e.turns) for e in episodes]),
        truncated=mean([d.truncated for d in dialogues]),
        parse_failures=mean([e.parse_failures for e in episodes]),
        policy_tokens=mean([sum(d.policy_mask) for d in dialogues]),
        seq_len=mean(lengths),
        time_rollout=all_reduce(t_rollout, dist.ReduceOp.MAX),
        time_generate=all_reduce(timing.get("generate", 0.0), dist.ReduceOp.MAX),
        time_simulator=all_reduce(timing.get("simulator", 0.0), dist.ReduceOp.MAX),
        time_update=all_reduce(t_update, dist.ReduceOp.MAX),
        gen_tokens_per_s=all_reduce(timing.get("tokens", 0) / max(timing.get("generate", 1e-9), 1e-9)),
        lr=run["optimizer"].param_groups[0]["lr"],
    )
    return metrics, dialogues


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoints/step_N/{hf/ (HF layout, loadable by transformers), trainer/ (sharded state)}


def checkpoint_dirs(out):
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = [int(n.split("_")[1]) for n in os.listdir(root)
             if n.startswith("step_") and os.path.isfile(os.path.join(root, n, "DONE"))]
    return [os.path.join(root, f"step_{s}") for s in sorted(steps)]


def stateful(run):
    """What --resume needs: model and optimizer state (sharded, via torch.distributed.checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, opt in (("policy", "optimizer"), ("critic", "critic_optimizer")):
        if name in run:
            model_sd, optim_sd = get_state_dict(run[name], run[opt])
            state[name], state[opt] = model_sd, optim_sd
    return state


def save_checkpoint(run, args, tokenizer, step):
    """Written to step_N.tmp and renamed when complete: a kill mid-save never leaves a broken checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank = dist.get_rank()
    final = os.path.join(args.out, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    full = get_model_state_dict(run["policy"], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        lm.save_model(full, run["policy"].config, os.path.join(tmp, "hf"), tokenizer)
    del full
    dcp.save(stateful(run), checkpoint_id=os.path.join(tmp, "trainer"))
    if rank == 0:
        extra = {k: run[k].state_dict() for k in ("scheduler", "critic_scheduler") if k in run}
        torch.save(extra, os.path.join(tmp, "schedulers.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "algo": args.algo, "world_size": dist.get_world_size()}, f)
        open(os.path.join(tmp, "DONE"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(args.out)[:-args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(run, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = stateful(run)
    dcp.load(state, checkpoint_id=os.path.join(path, "trainer"))
    for name, opt in (("policy", "optimizer"), ("critic", "critic_optimizer")):
        if name in run:
            set_state_dict(run[name], run[opt], model_state_dict=state[name], optim_state_dict=state[opt])
    extra = torch.load(os.path.join(path, "schedulers.pt"), weights_only=False)
    for k, v in extra.items():
        run[k].load_state_dict(v)
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)["step"]


# ----------------------------------------------------------------------------------------------------------
# Logging


def log_line(m, total_steps):
    return (f"step {m['step']}/{total_steps} | reward {m['reward']:.3f} ± {m['reward_std']:.3f} | "
            f"success {m['success']:.2f} fail {m['failure']:.2f} | turns {m['turns']:.1f} | "
            f"kl {m.get('kl_ref', 0.0):.4f} clip {m.get('clip_frac', 0.0):.3f} "
            f"ent {m.get('entropy', 0.0):.2f} | len {m['policy_tokens']:.0f} | "
            f"rollout {m['time_rollout']:.1f}s (sim {m['time_simulator']:.1f}s) update {m['time_update']:.1f}s | "
            f"{m['gen_tokens_per_s']:.0f} tok/s")


def transcript(d, step=None):
    e = d.episode
    return {"step": step, "profile_id": e.profile.id, "reward": sim.reward(e), "end_reason": e.end_reason,
            "initial_emotion": e.profile.initial_emotion, "opening": e.profile.opening,
            "turns": e.turns, "policy_texts": d.policy_texts, "parse_failures": e.parse_failures}


def append_jsonl(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def truncate_metrics(path, step):
    """On resume, drop metrics of steps after the checkpoint (they will be recomputed)."""
    if os.path.isfile(path):
        with open(path) as f:
            keep = [line for line in f if json.loads(line).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(keep)


# ----------------------------------------------------------------------------------------------------------
# Evaluation on the test profiles (greedy), each rank its share; benchmark.py writes the report.


def evaluate_policy(run, args, backend, tokenizer, eos_ids, test_profiles, step):
    import benchmark

    rank, world = dist.get_rank(), dist.get_world_size()
    profiles = test_profiles[:args.eval_profiles]
    mine = profiles[rank * len(profiles) // world:(rank + 1) * len(profiles) // world]  # contiguous: keeps order
    with generation_mode(run["policy"]):
        dialogues = rollout(run["policy"], tokenizer, mine, backend, think=args.think, max_turns=args.max_turns,
                            max_new_tokens=args.max_new_tokens, temperature=0.0, mode=args.mode,
                            max_context=args.max_context, eos_ids=eos_ids)
    gathered = [None] * world
    dist.all_gather_object(gathered, [d.episode for d in dialogues])
    if rank != 0:
        return None
    episodes = [e for part in gathered for e in part]
    return benchmark.report(episodes, os.path.join(args.out, "eval", f"step_{step}"), title=f"step {step}")


# ----------------------------------------------------------------------------------------------------------
# Main


class StopFlag:
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, exit. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"rlver: signal {signum}: finishing this step, then saving a checkpoint", flush=True)


def setup(args, argv):
    """Checks (cheap, one-line errors) and then the heavy part: models, optimizers."""
    if args.model is None:
        apply_demo_defaults(args, argv)
    rank, world, device = setup_distributed()
    from torch.distributed.fsdp import FSDPModule
    if not args.no_fsdp and not hasattr(FSDPModule, "set_reshard_after_forward"):
        raise ConfigError(f"torch {torch.__version__} lacks FSDPModule.set_reshard_after_forward, which the "
                          "rollout phase needs: install torch>=2.7, or run one process with --no-fsdp")
    if args.model == os.path.join(args.out, "tiny-qwen2") and not os.path.isdir(args.model):
        if rank == 0:
            print(f"rlver: demo mode: making a tiny random model in {args.model}", flush=True)
            lm.make_tiny_checkpoint(args.model, "qwen2", seed=args.seed, hidden_size=64, num_layers=2)
        dist.barrier()
    if args.model in lm.SHAPES:  # a real architecture with random weights (a smoke run at a real size)
        shape, args.model = args.model, os.path.join(args.out, f"random-{args.model}")
        if not os.path.isdir(args.model):
            if rank == 0:  # written next to it and renamed when complete: an interrupted write is never used
                print(f"rlver: making a random-weight {shape} checkpoint in {args.model} (once)", flush=True)
                shutil.rmtree(args.model + ".tmp", ignore_errors=True)
                os.replace(lm.make_random_checkpoint(args.model + ".tmp", lm.SHAPES[shape], seed=args.seed), args.model)
            dist.barrier()
    cfg = validate(args, world)
    tokenizer = lm.load_tokenizer(args.model)
    profiles = sim.load_profiles(args.train_profiles) if args.train_profiles else sim.builtin_profiles("train")
    test_profiles = sim.load_profiles(args.test_profiles) if args.test_profiles else sim.builtin_profiles("test")
    if not profiles:
        raise ConfigError("the training profile file is empty")
    try:
        backend = sim.make_backend(args.simulator, model_name=args.simulator_model,
                                   api_key_env=args.simulator_key_env, device=device)
    except (ValueError, lm.CheckpointError) as e:
        raise ConfigError(f"--simulator: {e}") from None
    backend.check()
    if args.resume and not checkpoint_dirs(args.out) and rank == 0:
        print(f"rlver: --resume: no checkpoint in {args.out}/checkpoints yet, starting at step 0", flush=True)
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({**vars(args), "world_size": world, "device": str(device), "torch": torch.__version__}, f, indent=2)

    torch.manual_seed(args.seed)
    run = {"device": device, "step": 0}
    run["policy"] = build_model(args, cfg, device, trainable=True)
    run["optimizer"] = torch.optim.AdamW(run["policy"].parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                         betas=(0.9, 0.999))
    warmup = lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    run["scheduler"] = torch.optim.lr_scheduler.LambdaLR(run["optimizer"], warmup)
    run["reference"] = build_model(args, cfg, device, trainable=False) if args.kl_coef > 0 else None
    if args.algo == "ppo":
        run["critic"] = build_model(args, cfg, device, trainable=True, critic=True)
        run["critic_optimizer"] = torch.optim.AdamW(run["critic"].parameters(), lr=args.critic_lr,
                                                    weight_decay=args.weight_decay)
        run["critic_scheduler"] = torch.optim.lr_scheduler.LambdaLR(run["critic_optimizer"], warmup)
    return run, tokenizer, profiles, test_profiles, backend


def train(args, argv=None):
    run, tokenizer, profiles, test_profiles, backend = setup(args, argv)
    rank = dist.get_rank()
    eos_ids = lm.stop_token_ids(tokenizer, args.model)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start = 0
    if args.resume and checkpoint_dirs(args.out):
        path = checkpoint_dirs(args.out)[-1]
        start = load_checkpoint(run, path)
        if rank == 0:
            truncate_metrics(metrics_path, start)
            print(f"rlver: resumed from {path} at step {start}", flush=True)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run: do not mix with an old one's metrics
    if rank == 0:
        print(f"rlver: {args.algo} on {args.model} | {dist.get_world_size()} process(es) on {run['device']} | "
              f"{len(profiles)} train profiles x {args.group_size} rollouts | simulator {args.simulator} "
              f"({args.mode}) | out {args.out}", flush=True)
    stop = StopFlag()
    step = start
    for step in range(start, args.steps):
        run["step"] = step
        metrics, dialogues = train_step(run, args, profiles, backend, tokenizer, eos_ids, step)
        if rank == 0:
            append_jsonl(metrics_path, [metrics])
            append_jsonl(os.path.join(args.out, "samples.jsonl"),
                         [transcript(d, step + 1) for d in dialogues[:args.log_samples]])
            print(log_line(metrics, args.steps), flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            summary = evaluate_policy(run, args, backend, tokenizer, eos_ids, test_profiles, step + 1)
            if rank == 0:
                print(f"eval step {step + 1}: score {summary['score']:.1f} success {summary['success_rate']:.2f} "
                      f"failure {summary['failure_rate']:.2f}", flush=True)
        stop_now = all_reduce(float(stop.requested), dist.ReduceOp.MAX) > 0
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop_now:
            path = save_checkpoint(run, args, tokenizer, step + 1)
            if rank == 0:
                print(f"rlver: saved {path}", flush=True)
        if stop_now:
            break
    if rank == 0:
        rewards = [json.loads(line)["reward"] for line in open(metrics_path)]
        k = max(1, min(5, len(rewards) // 2))
        print(f"rlver: done. mean reward over the first {k} steps {sum(rewards[:k]) / k:.3f}, over the last {k} "
              f"{sum(rewards[-k:]) / k:.3f}. Metrics: {metrics_path}; transcripts: "
              f"{os.path.join(args.out, 'samples.jsonl')}; model (HF layout): {checkpoint_dirs(args.out)[-1]}/hf",
              flush=True)
    return step + 1


def main(argv=None):
    args = get_args(argv)
    try:
        train(args, argv)
    except (ConfigError, lm.CheckpointError, sim.ProfileError, sim.SimulatorError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:  # under torchrun: one line, not one per rank
            print(f"rlver: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
