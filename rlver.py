"""
rlver.py: train an empathetic dialogue policy with RLVER (Wang et al. 2025, arXiv 2507.03112).

    python rlver.py                        # CPU demo: tiny model + rules simulator, reward rises
    torchrun --nproc_per_node 8 rlver.py --model /models/Qwen2.5-7B-Instruct --simulator http://localhost:8000/v1

One step (train_step): profiles -> rollout (rollout.py) -> reward = final emotion / 100 -> score -> advantages
(grpo.py / ppo.py) -> update -> metrics. Then: setup and FSDP2, checkpoints, the guards of a long run, the loop.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import benchmark
import grpo
import model as lm
import ppo
import rollout as ro
import simulator as sim

# Config: every knob a flag, its range check beside it; the resolved config goes to <out>/config.json --------

GAMMA = LAM = 1.0  # GAE, official: an outcome reward on the last token, undiscounted
GRAD_CLIP = 1.0  # official
KEEP_CHECKPOINTS = 2  # the newest checkpoints kept in <out>/checkpoints
LOG_SAMPLES = 2  # transcripts per step in samples.jsonl

DEMO = dict(  # `python rlver.py` with no --model: everything small enough for a laptop CPU
    steps=30, profiles_per_step=8, max_turns=3, max_new_tokens=24, micro_batch=16, lr=1e-2, critic_lr=1e-2,
    warmup_ratio="0,0", out="runs/demo", save_every=10, eval_every=15,
    protocol="classic", entropy_coef=0.0, weight_decay=0.0)  # our English rules users, no extra terms


class ConfigError(ValueError):
    """A bad flag, path or state of --out: one line, exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a None default is described in the flag's own help
        return action.help if action.default is None else super()._get_help_string(action)


def warmup_ratios(text):
    """--warmup-ratio ACTOR[,CRITIC]: fractions of --steps in [0, 1); one value serves both."""
    parts = [sim.in_range(0, 1)(t) for t in text.split(",")]
    if len(parts) > 2 or max(parts) >= 1:
        raise argparse.ArgumentTypeError(f"{text}: give one or two fractions of --steps in [0, 1), e.g. 0.02,0.05")
    return (parts[0], parts[-1])


def get_args(argv=None):
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items())
    p = sim.Parser(name="rlver", description="RLVER: RL with verifiable emotion rewards (PPO / GRPO).",
                   formatter_class=HelpFormatter, epilog=f"Demo mode (no --model): a tiny random model on CPU, and "
                   f"these defaults instead of the ones above (a flag you give wins): {demo}. CPU runs use one torch "
                   f"thread unless OMP_NUM_THREADS says otherwise (README: CPU threads).")
    a, count, positive, share = p.add_argument, sim.in_range(1, kind=int), sim.in_range(0, above=True), sim.in_range(0)
    a("--algo", choices=["grpo", "ppo"], default="grpo")
    a("--model", default=None, help=f"HF checkpoint dir, or random weights: {'|'.join(lm.SHAPES)}; none: demo")
    a("--out", default="runs/rlver", help="output dir: config, metrics.jsonl, samples, checkpoints")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run (deleted)")
    a("--seed", type=int, default=0)
    sim.add_simulator_flags(a, protocol="rlver", max_parse_failure_rate=0.5)
    a("--train-profiles", default=None, help="profile JSONL (ours or the public RLVER layout); default: built-in")
    a("--test-profiles", default=None, help="profile JSONL for periodic evaluation; default: built-in test set")
    a("--think", action=argparse.BooleanOptionalAction, default=False, help="think-then-say template (official: off)")
    a("--think-history", choices=["keep", "strip"], default="keep", help="keep: a sample per dialogue; strip: "
      "earlier <think> blocks leave the context, a sample per turn (official think rollout)")
    a("--max-new-tokens", type=count, default=1024, help="per policy turn (cut replies are counted; README)")
    a("--max-context", type=count, default=4096, help="a dialogue that would outgrow this many tokens ends early")
    a("--temperature", type=positive, default=1.0, help="sampling temperature (top-p is 1, official)")
    a("--compile", action="store_true", help="torch.compile the rollout's decode step (CUDA graphs on GPU)")
    a("--steps", type=count, default=200)
    a("--profiles-per-step", type=count, default=32, help="global number of profiles per step")
    a("--group-size", type=count, default=None, help="rollouts per profile (default: 4 for grpo, 1 for ppo)")
    a("--micro-batch", type=count, default=4, help="dialogues per forward/backward")
    a("--mini-batches", type=count, default=1, help="optimizer steps per step (one pass over its rollouts)")
    a("--lr", type=positive, default=1e-6)
    a("--critic-lr", type=positive, default=5e-6)
    a("--warmup-ratio", type=warmup_ratios, default="0.02,0.05", metavar="ACTOR[,CRITIC]", help="LR warmup, of --steps")
    a("--weight-decay", type=share, default=0.01)
    a("--clip-ratio", type=share, default=0.2, help="PPO clip: the policy ratio within [1 - this, 1 + this]")
    a("--value-clip", type=share, default=0.5)
    a("--kl-coef", type=share, default=0.0, help="GRPO: k3 KL in the loss; PPO: k1 in the reward; 0: no reference")
    a("--entropy-coef", type=share, default=0.001, help="entropy bonus: loss -= coef x mean policy entropy")
    a("--no-std", action="store_true", help="GRPO without dividing by the group std (Dr.GRPO)")
    a("--loss-agg", choices=["token-mean", "seq-mean-token-mean"], default="token-mean")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="compute: auto = bf16 on GPU")
    a("--no-fsdp", action="store_true", help="single process without FSDP (plain module)")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, help="recompute blocks (default: on CUDA)")
    a("--save-every", type=count, default=50, help="checkpoint every N steps (and at the end)")
    a("--eval-every", type=sim.in_range(0, kind=int), default=0, help="evaluate every N steps (0: never)")
    args = p.parse_args(argv)
    if args.model is None:  # demo mode: DEMO's defaults, parsed again so that a flag given (even abbreviated) wins
        p.set_defaults(**DEMO)
        args = p.parse_args(argv)
    args.group_size = args.group_size or (4 if args.algo == "grpo" else 1)
    args.max_turns = args.max_turns or sim.PROTOCOLS[args.protocol].max_turns
    return args


def validate_args(args, world):
    """What no single flag's range says, checked before anything is written."""
    per_step, per_rank = args.profiles_per_step, args.profiles_per_step // world * args.group_size
    for bad, line in (
            (args.algo == "grpo" and args.group_size < 2, "--group-size must be >= 2 for grpo (the group baseline)"),
            (per_step % world, f"--profiles-per-step {per_step} must be divisible by the {world} processes"),
            (per_rank % args.mini_batches,
             f"--mini-batches {args.mini_batches} must divide the {per_rank} dialogues per process"),
            (args.no_fsdp and world > 1, "--no-fsdp is for a single process; drop it under torchrun"),
            (args.resume and args.overwrite, "--resume and --overwrite contradict each other: give one"),
            (not (args.no_fsdp or hasattr(FSDPModule, "set_reshard_after_forward")),
             f"torch {torch.__version__} lacks FSDPModule.set_reshard_after_forward, which the rollout needs: "
             f"install torch>=2.7, or run one process with --no-fsdp")):
        if bad:
            raise ConfigError(line)


# One training step ------------------------------------------------------------------------------------------

def step_profiles(n_profiles, per_step, step, seed):
    """A step's profile indices: the training set visited epoch by epoch, each epoch in its own shuffled order."""
    order = lambda epoch: torch.randperm(n_profiles, generator=torch.Generator().manual_seed(seed + epoch))  # noqa
    # g: the global position in the stream of profiles
    return [int(order(g // n_profiles)[g % n_profiles]) for g in range(step * per_step, (step + 1) * per_step)]


def train_step(run, args, step):
    """One RLVER step: profiles -> rollout -> reward -> score -> advantages -> update -> metrics."""
    rank, share = dist.get_rank(), args.profiles_per_step // dist.get_world_size()
    mine = step_profiles(len(run.profiles), args.profiles_per_step, step, args.seed)[rank * share:(rank + 1) * share]
    first = rank * share * args.group_size  # global index of this rank's first dialogue (a group is on one rank)
    seeds = [ro.rollout_seed(args.seed, step, first + j) for j in range(share * args.group_size)]
    timing, t0 = {}, time.time()
    peak_memory_gb(run.device)  # (resets the peak)
    dialogues = play(run, args, [run.profiles[i] for i in mine], args.group_size, seeds, args.temperature, timing)
    timing["rollout"], timing["peak_gb_rollout"] = time.time() - t0, peak_memory_gb(run.device)
    failures = check_parse_failures(args, [d.episode for d in dialogues], f"step {step + 1}")  # before any update
    t0 = time.time()
    rewards = torch.tensor([sim.reward(d.episode) for d in dialogues], device=run.device)  # (B,)
    batch = score_rollouts(run, args, ro.training_samples(dialogues))
    batch["advantages"] = advantages(run, args, batch, rewards)
    stats = update(run, batch, args, step)
    timing["update"], timing["peak_gb_update"] = time.time() - t0, peak_memory_gb(run.device)
    metrics = step_metrics(run, dialogues, rewards, batch, stats, timing)
    metrics["parse_failed_turns"], metrics["simulator_turns"] = failures
    if args.compile:  # dynamo's counters so far on this rank: one compile per (dialogue count, bucket) expected
        from torch._dynamo.utils import counters
        metrics.update(compiles=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                       cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    return metrics, dialogues


def peak_memory_gb(device):
    """The peak GPU memory allocated since the last call, in GB (then reset); None on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
        return peak


def play(run, args, profiles, group, seeds, temperature, timing=None):
    """Each profile prepared (its group shares an opening), played `group` times; a simulator error stops every rank."""
    def rollout():
        with generation_mode(run.policy):
            prepared = sim.prepare_profiles(profiles, run.backend, protocol=args.protocol, mode=args.mode)
            played = [p for p in prepared for _ in range(group)]
            return ro.rollout(run.policy, run.tokenizer, played, run.backend, seeds=seeds, think=args.think,
                              think_history=args.think_history, max_turns=args.max_turns, mode=args.mode,
                              max_new_tokens=args.max_new_tokens, temperature=temperature, max_context=args.max_context,
                              timing=timing, compile=args.compile, turn_deadline=args.simulator_turn_deadline,
                              log=(lambda line: print(line, flush=True)) if dist.get_rank() == 0 else None)
    return together(rollout, sim.SimulatorError)


def micro_batches(rows, size, ids, lengths):
    """(rows, ids[rows] cut to the longest of those rows: (b, T_rows)) per micro-batch of `size` rows."""
    for i in range(0, len(rows), size):
        part = rows[i:i + size]
        yield part, ids[part, :max(lengths[r] for r in part)]


def reuses_update_forward(run, args):
    """One mini-batch: pi_old is the update's own forward (ratio 1); not for PPO's KL reward (needs pi_old first)."""
    return args.mini_batches == 1 and (args.algo == "grpo" or run.reference is None)


@torch.no_grad()
def score_rollouts(run, args, samples):
    """The batch: ids (B, T), mask, and per target ids[:, 1:] pi_old/pi_ref log-probs and PPO values, (B, T-1)."""
    # FSDP needs the same micro-batches on every rank: a rank with fewer (turn) samples gets empty ones
    most = int(all_reduce(len(samples), dist.ReduceOp.MAX))
    samples = samples + [ro.Sample([run.tokenizer.pad_token_id] * 2, [False, False], 0)] * (most - len(samples))
    ids, mask = ro.collate(samples, run.tokenizer.pad_token_id, run.device)
    batch = {"ids": ids, "mask": mask, "lengths": [len(s.ids) for s in samples],
             "dialogue": torch.tensor([s.dialogue for s in samples], device=run.device)}
    for key, model in (("old_logprobs", run.policy), ("ref_logprobs", run.reference), ("old_values", run.critic)):
        if model is None or (key == "old_logprobs" and reuses_update_forward(run, args)):
            continue
        batch[key] = torch.zeros(mask.shape, device=mask.device)  # (B, T-1)
        for rows, x in micro_batches(list(range(len(ids))), args.micro_batch, ids, batch["lengths"]):
            y = model(x) if key == "old_values" else lm.token_logprobs(model, x, args.temperature)
            batch[key][rows, :y.shape[1]] = y.float()
    return batch


def advantages(run, args, batch, rewards):
    """(B, T-1) advantages, each sample taking its dialogue's reward: GRPO group-relative, PPO GAE whitened."""
    mask, dialogue, strip = batch["mask"], batch["dialogue"], args.think_history == "strip"
    if args.algo == "grpo":  # dialogues i*G .. (i+1)*G-1 are profile i's group; strip: over its turn samples (grpo.py)
        rows = dialogue if strip else torch.arange(len(rewards), device=rewards.device)  # each row's dialogue
        adv = grpo.group_advantages(rewards[rows], rows // args.group_size, mask.any(1) if strip else None,
                                    scale_by_std=not args.no_std)  # (rows,)
        return (adv if strip else adv[dialogue])[:, None] * mask
    kl = args.kl_coef if "ref_logprobs" in batch else 0.0
    token_rewards = ppo.token_rewards(rewards[dialogue], mask, batch.get("old_logprobs"), batch.get("ref_logprobs"), kl)
    adv, batch["returns"] = ppo.compute_gae(token_rewards, batch["old_values"], mask, GAMMA, LAM)
    return ppo.masked_whiten(adv, mask, reduce=all_reduce)


def step_metrics(run, dialogues, rewards, batch, stats, timing):
    """One metrics.jsonl row: the update's metrics plus means over the global batch of dialogues."""
    episodes, n = [d.episode for d in dialogues], all_reduce(len(dialogues))
    mean = lambda xs: all_reduce(sum(xs)) / n  # noqa: E731
    rank_max = lambda key: all_reduce(timing.get(key, 0.0), dist.ReduceOp.MAX)  # noqa: E731 (the slowest rank's)
    reward, real = mean(rewards.tolist()), batch["mask"].sum(1) > 0  # real: (B,) samples with policy tokens
    metrics, samples = dict(stats), all_reduce(float(real.sum()))
    if "ref_logprobs" in batch:  # k1 estimate of KL(pi_old || pi_ref) over the global batch's policy tokens
        metrics["kl_ref"] = ppo.masked_mean(batch["old_logprobs"] - batch["ref_logprobs"], batch["mask"],
                                            reduce=all_reduce).item()
    metrics.update({k: rank_max(k) for k in ("peak_gb_rollout", "peak_gb_update") if run.device.type == "cuda"})
    outcomes = [sim.final_outcome(e.emotion, e.profile.protocol) for e in episodes]
    return metrics | dict(
        reward=reward, reward_std=max(mean([r * r for r in rewards.tolist()]) - reward ** 2, 0.0) ** 0.5,
        emotion=mean([e.emotion for e in episodes]), success=mean([o == "success" for o in outcomes]),
        failure=mean([o == "failure" for o in outcomes]), turns=mean([len(e.turns) for e in episodes]),
        truncated=mean([d.truncated for d in dialogues]), parse_failures=mean([e.parse_failures for e in episodes]),
        policy_tokens=mean([sum(d.policy_mask) for d in dialogues]),
        seq_len=all_reduce(sum(n for n, r in zip(batch["lengths"], real.tolist()) if r)) / max(samples, 1),
        samples=samples,  # training sequences with policy tokens (the padding ones do not count)
        prefill_tokens=all_reduce(timing.get("prefill_tokens", 0)),  # what the rollout engine fed the model
        conversation_tokens=all_reduce(timing.get("conversation_tokens", 0)),  # the conversations' own length
        decode_steps=rank_max("decode_steps"),
        active_rows=all_reduce(timing.get("active_rows", 0)) / max(all_reduce(timing.get("decode_steps", 0)), 1),
        **{f"time_{k}": rank_max(k) for k in ("rollout", "generate", "simulator", "update")},
        gen_tokens_per_s=all_reduce(timing.get("tokens", 0) / max(timing.get("generate", 1e-9), 1e-9)),
        lr=run.optimizer.param_groups[0]["lr"],
        **{k: all_reduce(sum(getattr(e, k) for e in episodes)) for k in sim.COUNTS})  # totals, warned per step


def evaluate_policy(run, args, step):
    """Every test profile played greedily, a contiguous share per rank; rank 0 writes eval/step_N/."""
    rank, world, profiles = dist.get_rank(), dist.get_world_size(), run.test_profiles
    lo, hi = rank * len(profiles) // world, (rank + 1) * len(profiles) // world
    dialogues = play(run, args, profiles[lo:hi], 1, seeds=list(range(lo, hi)), temperature=0.0)
    check_parse_failures(args, [d.episode for d in dialogues], f"evaluation at step {step}")
    gathered = [None] * world
    dist.all_gather_object(gathered, [d.episode for d in dialogues])
    episodes = [e for part in gathered for e in part]
    if rank == 0:
        provenance = benchmark.provenance(args, profiles, args.test_profiles, list(range(len(profiles))), 0.0)
        benchmark.report(episodes, os.path.join(args.out, "eval", f"step_{step}"), config={"provenance": provenance},
                         title=f"step {step} ({benchmark.setting_label(args)})")  # (it prints the score)


# The update: clipped-surrogate losses, --mini-batches optimizer steps over the step's rollouts --------------

SUMMED = ("loss", "policy_loss", "value_loss")  # micro-batch losses already / N_global: they add up, not average
GRAD_NORMS = {"policy": "grad_norm", "critic": "critic_grad_norm"}  # one per optimizer step, alike on all ranks


def shuffle_seed(seed, step):
    """The mini-batch shuffle's seed per (run seed, step), salted: no dialogue's stream has it."""
    return ro.rollout_seed(seed + 7_919, step, 0)


def update(run, batch, args, step):
    """--mini-batches optimizer steps over the step's rollouts (PPO's critic alongside); the update's metrics."""
    ids, mask, lengths, world = batch["ids"], batch["mask"], batch["lengths"], dist.get_world_size()
    reuse, sums = "old_logprobs" not in batch, {}  # reuse (reuses_update_forward): pi_old = this forward, filled in
    batch.setdefault("old_logprobs", torch.zeros(mask.shape, device=mask.device))  # (B, T-1)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(shuffle_seed(args.seed, step)))
    for mini in [part.tolist() for part in order.tensor_split(args.mini_batches)]:
        # / the GLOBAL count (all ranks' micro-batches) / world, as FSDP averages gradients (ppo.aggregate)
        scale = dict(agg=args.loss_agg, loss_scale_tokens=all_reduce(mask[mini].sum().item()) / world,
                     loss_scale_seqs=all_reduce((mask[mini].sum(1) > 0).sum().item()) / world)
        for rows, x in micro_batches(mini, args.micro_batch, ids, lengths):
            mb = {k: v[rows, :x.shape[1] - 1] for k, v in batch.items() if k not in ("ids", "lengths", "dialogue")}
            logprobs, entropy = lm.token_logprobs(run.policy, x, args.temperature, return_entropy=True)
            if reuse:  # ratio exactly 1 on this (only) pass
                mb["old_logprobs"] = batch["old_logprobs"][rows, :logprobs.shape[1]] = logprobs.detach()
            loss, metrics = micro_batch_loss(run, args, x, mb, logprobs, scale)
            if args.entropy_coef:  # entropy bonus (official 0.001), aggregated like the policy loss
                loss = loss - args.entropy_coef * ppo.aggregate(entropy, mb["mask"], **scale)
            loss.backward()
            metrics["entropy"] = ppo.masked_mean(entropy.detach(), mb["mask"])
            for k, v in (metrics | {"_tokens": 1.0}).items():  # losses (already / N_global) add up; the rest by tokens
                sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k in SUMMED else mb["mask"].sum().item())
        for name, model, optimizer, _ in run.trained():
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # (a DTensor under FSDP2)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums[GRAD_NORMS[name]] = sums.get(GRAD_NORMS[name], 0.0) + norm.item()
    for _, _, _, scheduler in run.trained():
        scheduler.step()
    tokens, n = all_reduce(sums.pop("_tokens")), args.mini_batches
    return {k: v / n if k in GRAD_NORMS.values() else all_reduce(v) / (world * n if k in SUMMED else max(tokens, 1))
            for k, v in sums.items()}


def micro_batch_loss(run, args, x, mb, logprobs, scale):
    """GRPO's loss, or PPO's policy + value loss (the critic shares no parameter: one backward serves both)."""
    eps, value_clip = args.clip_ratio, args.value_clip
    if args.algo == "grpo":
        return grpo.grpo_loss(logprobs, mb["old_logprobs"], mb.get("ref_logprobs"), mb["advantages"], mb["mask"],
                              eps, eps, args.kl_coef, **scale)
    loss, metrics = ppo.policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], eps, eps, **scale)
    vloss, vmetrics = ppo.value_loss(run.critic(x), mb["old_values"], mb["returns"], mb["mask"], value_clip, **scale)
    return loss + vloss, metrics | vmetrics | {"loss": loss.detach()}


# Setup: one process per device (torchrun), FSDP2 shards parameters, grads and optimizer state ---------------

@dataclass
class Run:
    device: torch.device
    tokenizer: object  # (its folder's config and generation_config name the stop tokens: model.stop_token_ids)
    profiles: list  # training profiles (simulator.Profile)
    test_profiles: list
    backend: object  # the simulated user (simulator.backend_from_flags)
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    reference: torch.nn.Module = None  # frozen initial policy; only when --kl-coef > 0
    critic: torch.nn.Module = None  # PPO only
    critic_optimizer: torch.optim.Optimizer = None
    critic_scheduler: object = None

    def trained(self):  # (name, model, optimizer, scheduler): the policy, and the PPO critic
        critic = [("critic", self.critic, self.critic_optimizer, self.critic_scheduler)] if self.critic else []
        return [("policy", self.policy, self.optimizer, self.scheduler)] + critic


USER_ERRORS = (ConfigError, lm.CheckpointError, sim.ProfileError, sim.SimulatorError, benchmark.BenchmarkError)


def setup(args):
    """Cheap checks, then models and optimizers; a check that reads files or endpoints stops every rank together."""
    make_model = resolve_model(args)
    validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # flags only: alike on every rank
    alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)  # python rlver.py
    cuda = torch.cuda.is_available()  # a backend per device: NCCL for CUDA tensors, gloo for gathers of CPU objects
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=device if cuda else None, **alone)
    if args.activation_checkpointing is None:  # on by default on CUDA: 7B does not fit without it
        args.activation_checkpointing = device.type == "cuda"
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # README, "CPU threads": near the best when idle, never collapses under load
    profiles, test_profiles, backend, official = together(lambda: [
        sim.load_profiles(args.train_profiles) if args.train_profiles else sim.builtin_profiles("train"),
        sim.load_profiles(args.test_profiles) if args.test_profiles else sim.builtin_profiles("test"),
        sim.backend_from_flags(args, device), args.official_prompts and sim.load_official_prompts(
            args.official_prompts, args.protocol, args.think, args.official_quirks, args.simulator)], USER_ERRORS)
    args.resume_from = claim_out(args)  # the first write into --out
    if make_model and dist.get_rank() == 0 and not os.path.isdir(args.model):  # once, via a renamed .tmp
        print(f"rlver: making a random-weight model in {args.model} (once)", flush=True)
        shutil.rmtree(args.model + ".tmp", ignore_errors=True)
        os.replace(make_model(args.model + ".tmp"), args.model)
    dist.barrier()
    profiles, test_profiles = ([replace(p, prompts=official) for p in ps] for ps in (profiles, test_profiles))
    cfg, tokenizer = together(lambda: validate_model(args, profiles), USER_ERRORS)
    if args.overwrite and dist.get_rank() == 0:  # every check passed: the earlier run's files go
        for path in (os.path.join(args.out, name) for name in RUN_FILES):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    dist.barrier()
    torch.manual_seed(args.seed)  # the models and their optimizers: the policy, the reference (--kl-coef), PPO's critic

    def trainable(lr, ratio, critic=False):  # the model, AdamW, a linear warmup over ratio x --steps, then constant
        model, n = build_model(args, cfg, device, True, critic), max(1, int(ratio * args.steps))  # (1: no warmup)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / n))
    policy, optimizer, scheduler = trainable(args.lr, args.warmup_ratio[0])
    run = Run(device=device, tokenizer=tokenizer, profiles=profiles, test_profiles=test_profiles, backend=backend,
              policy=policy, optimizer=optimizer, scheduler=scheduler)
    if args.kl_coef > 0:
        run.reference = build_model(args, cfg, device, trainable=False)
    if args.algo == "ppo":
        run.critic, run.critic_optimizer, run.critic_scheduler = trainable(args.critic_lr, args.warmup_ratio[1], True)
    return run


def together(fn, catch):
    """fn() on every rank; an error of `catch` on any rank is raised on every rank (none left in a collective)."""
    errors = [None] * dist.get_world_size()
    try:
        result, error = fn(), None
    except catch as e:
        result, error = None, e
    dist.all_gather_object(errors, error)
    if raised := [e for e in errors if e is not None]:
        raise raised[0]
    return result


def all_reduce(x, op=dist.ReduceOp.SUM):
    """x over every rank: a float for a number (in float64), a tensor for a tensor (ppo's `reduce` hook)."""
    t = x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t if torch.is_tensor(x) else t.item()


def resolve_model(args):
    """No --model: the demo's tiny model, <out>/tiny-qwen2; a SHAPES name: <out>/random-NAME. Returns its maker."""
    if args.model is None:
        args.model = os.path.join(args.out, "tiny-qwen2")
        if os.environ.get("RANK", "0") == "0":
            print(f"rlver: demo mode (no --model): a tiny random model in {args.model}", flush=True)
        return lambda path: lm.make_tiny_checkpoint(path, "qwen2", seed=args.seed, hidden_size=64, num_layers=2)
    if args.model in lm.SHAPES:
        shape, args.model = args.model, os.path.join(args.out, f"random-{args.model}")
        return lambda path: lm.make_random_checkpoint(path, lm.SHAPES[shape], seed=args.seed)


def validate_model(args, profiles):
    """The checkpoint's config, weights and tokenizer, and room for a turn after the longest opening prompt."""
    cfg = lm.read_config(args.model)  # raises CheckpointError with the fix
    lm.check_weights(args.model)  # a truncated or corrupt *.safetensors, found in milliseconds
    tokenizer = lm.load_tokenizer(args.model)
    profiles = [sim.resolve_profile(p, args.protocol) for p in profiles]
    longest = max(len(tokenizer.encode(ro.render(tokenizer, [
        {"role": "system", "content": ro.system_prompt(args.think, p.lang, p.prompts)},
        {"role": "user", "content": p.opening or ""}], True), add_special_tokens=False)) for p in profiles)
    if (need := longest + args.max_new_tokens) > args.max_context:
        raise ConfigError(f"--max-context {args.max_context} leaves no room for a turn: the longest opening prompt is "
                          f"{longest} tokens + --max-new-tokens {args.max_new_tokens}: give --max-context >= {need}")
    return cfg, tokenizer


def build_model(args, cfg, device, trainable, critic=False):
    """The policy, reference or critic: fp32 master weights (bf16 ones lose lr 1e-6 updates), bf16 compute."""
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    if args.no_fsdp:  # a plain module: loaded directly (keeps a tied embedding/head tied)
        module = lm.load_model(args.model, device, torch.float32)
        module.autocast_dtype = torch.bfloat16 if bf16 else None
        if critic:
            torch.manual_seed(args.seed)
            module = ppo.Critic(module)
    else:
        with torch.device("meta"):  # FSDP2: per block then the root, filled from rank 0's weights shard by shard
            module = ppo.Critic(lm.Transformer(cfg)) if critic else lm.Transformer(cfg)
        # bf16 copies of the fp32 master weights all-gathered per forward/backward, gradients reduced in fp32
        mp = MixedPrecisionPolicy(**(dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}))
        for block in [*(module.backbone if critic else module).model.layers, module]:
            fully_shard(block, mp_policy=mp)
        module.to_empty(device=device)
        state = lm.load_state_dict(args.model, dtype=torch.float32) if dist.get_rank() == 0 else {}
        if state and cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        if critic:  # the value head is new: the Critic's own init, on a real device (rank 0's is broadcast)
            torch.manual_seed(args.seed)
            head = ppo.init_value_head(torch.nn.Linear(cfg.hidden_size, 1))
            if state:  # (the critic has no output head: ppo.Critic)
                state = {f"backbone.{k}": v for k, v in state.items() if k != "lm_head.weight"}
                state.update({"value_head.weight": head.weight.data, "value_head.bias": head.bias.data})
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        (module.backbone if critic else module).reset_rope(device)
    (module.backbone if critic else module).gradient_checkpointing = args.activation_checkpointing and trainable
    module.requires_grad_(trainable)
    return module if trainable else module.eval()


@contextlib.contextmanager
def generation_mode(model):
    """The policy unsharded once for the rollout: no all-gather per token, so ranks may decode different lengths."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:  # every block and the root
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    model.eval()
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()
        model.train()


# Checkpoints: <out>/checkpoints/step_N/{hf/ (HF layout, for transformers), trainer/ (sharded state)} --------

def checkpoint_dirs(out):
    """The complete checkpoints, oldest first: step_N with DONE (a step_N.tmp, killed mid-save, is ignored)."""
    root = os.path.join(out, "checkpoints")
    steps = [int(n[5:]) for n in (os.listdir(root) if os.path.isdir(root) else [])
             if n.startswith("step_") and n[5:].isdecimal() and os.path.isfile(os.path.join(root, n, "DONE"))]
    return [os.path.join(root, f"step_{s}") for s in sorted(steps)]


def trainer_state(run):
    """What --resume needs: model and optimizer state of the policy (and critic), sharded, for DCP."""
    return {k: v for name, model, optimizer, _ in run.trained()
            for k, v in zip((name, f"{name}_optimizer"), get_state_dict(model, optimizer))}


def describe(e):
    """An error in one line: its type and first line (for DCP's CheckpointException, the failing rank's own)."""
    e = next(iter(e.failures.values()))[0] if hasattr(e, "failures") else e  # (CheckpointException)
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def save(run, args, step):
    """step_N.tmp (each rank writes its trainer/ shard, rank 0 the rest), renamed when complete; then curves.svg."""
    rank, final = dist.get_rank(), os.path.join(args.out, "checkpoints", f"step_{step}")
    tmp, failed = final + ".tmp", (OSError, SafetensorError)  # safetensors reports a full disk as its own error
    try:  # each `together` is also the barrier between the ranks' parts
        together(lambda: rank == 0 and shutil.rmtree(tmp, ignore_errors=True), failed)  # (a save killed earlier)
        dcp.save(trainer_state(run), checkpoint_id=os.path.join(tmp, "trainer"))  # a failed shard raises on all ranks
        full = get_model_state_dict(run.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        together(lambda: rank == 0 and finish_checkpoint(run, args, step, full, tmp, final), failed)
    except (*failed, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        # fp32 weights and both AdamW moments of what is trained, and the policy's hf/ (at most fp32)
        need = sum(p.numel() * (12 if m is run.critic else 16) for _, m, _, _ in run.trained() for p in m.parameters())
        raise ConfigError(f"saving {tmp} failed ({describe(e)}): a checkpoint needs up to {need / 2**20:.1f} MiB "
                          f"free on that disk ({shutil.disk_usage(os.path.dirname(final)).free / 2**20:.1f} MiB free "
                          f"now); the .tmp is removed and every earlier checkpoint kept: free space, then continue "
                          f"with --resume") from None
    if rank == 0:
        benchmark.write_curves(os.path.join(args.out, "curves.svg"), benchmark.run_rows(args.out),
                               title=f"rlver {args.algo} ({benchmark.setting_label(args)})")
        print(f"rlver: saved {final}", flush=True)


def finish_checkpoint(run, args, step, full, tmp, final):
    """Rank 0: hf/ (the source's dtype and generation_config.json), the small files, DONE, the rename, pruning."""
    lm.save_model(full, run.policy.config, os.path.join(tmp, "hf"), run.tokenizer)
    if os.path.isfile(os.path.join(args.model, "generation_config.json")):
        shutil.copy(os.path.join(args.model, "generation_config.json"), os.path.join(tmp, "hf"))
    torch.save({name: s.state_dict() for name, _, _, s in run.trained()}, os.path.join(tmp, "schedulers.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "algo": args.algo, "world_size": dist.get_world_size()}, f)
    open(os.path.join(tmp, "DONE"), "w").close()
    shutil.rmtree(final, ignore_errors=True)  # (a damaged checkpoint of this step, redone after --resume)
    os.replace(tmp, final)
    for old in checkpoint_dirs(args.out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def resume_checkpoint(out, warn=False):
    """The newest readable one of out's checkpoints (small files load, shards whole); warn: a line per damaged one."""
    damaged = []
    for path in reversed(checkpoint_dirs(out)):
        try:
            torch.load(os.path.join(path, "schedulers.pt"), weights_only=False)
            storage = dcp.FileSystemReader(os.path.join(path, "trainer")).read_metadata().storage_data or {}
            short = [i.relative_path for i in storage.values()
                     if os.path.getsize(os.path.join(path, "trainer", i.relative_path)) < i.offset + i.length]
            if short:
                raise OSError(f"{os.path.join(path, 'trainer', short[0])} is truncated")
            for line in damaged if warn else []:
                print(f"rlver: warning: --resume: {line}; left in place, resuming from an older checkpoint", flush=True)
            return path
        except Exception as e:  # noqa: BLE001 (unreadable in any way is damaged: OSError, pickle, zip errors)
            damaged.append(f"{path} is damaged ({describe(e)})")
    raise ConfigError(f"--resume: no checkpoint in {out}/checkpoints is readable ({'; '.join(damaged)}): start "
                      f"afresh with --overwrite, or in another --out")


def start_step(run, args):
    """0 for a fresh run; with --resume the checkpoint's step, its state restored, later rows dropped (redone)."""
    start, path = 0, args.resume_from
    if path:
        try:
            state = trainer_state(run)
            dcp.load(state, checkpoint_id=os.path.join(path, "trainer"))
            schedulers = torch.load(os.path.join(path, "schedulers.pt"), weights_only=False)
            for name, model, optim, scheduler in run.trained():
                set_state_dict(model, optim, model_state_dict=state[name], optim_state_dict=state[f"{name}_optimizer"])
                scheduler.load_state_dict(schedulers[name])
            start = int(os.path.basename(path)[len("step_"):])
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (damaged past resume_checkpoint's look)
            raise ConfigError(f"--resume: cannot load {path} ({describe(e)}): move it out of {args.out}/checkpoints "
                              f"to resume from the one before") from None
    if not (args.resume and dist.get_rank() == 0):
        return start
    for log in (os.path.join(args.out, name) for name in ("metrics.jsonl", "samples.jsonl")):
        with contextlib.suppress(FileNotFoundError), open(log) as f:
            lines = list(enumerate(f, 1))
            with open(log, "w") as out:  # rows after `start` dropped (redone), and a torn line (a kill mid-write)
                for n, line in lines:
                    try:
                        if json.loads(line).get("step", 0) <= start:
                            out.write(line if line.endswith("\n") else line + "\n")
                    except ValueError:
                        print(f"rlver: warning: --resume: {log}:{n} is torn (not a JSON row): dropped", flush=True)
    print(f"rlver: resumed from {path} at step {start}" if path else
          f"rlver: --resume: no checkpoint in {args.out}/checkpoints yet, starting at step 0", flush=True)
    return start


# Guards: one writer per --out, runs never mixed, --resume's checks, parse health, signals -------------------

RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "eval", "curves.svg")  # what a run writes in --out
RESUME_KEYS = ("algo", "model", "train_profiles", "profiles_per_step", "group_size", "mini_batches", "seed", "think",
               "mode", "official_prompts", "official_quirks")  # what a resumed run must share with its run


def check_out(args, warn=False):
    """benchmark.check_out; for --resume the run's flags (RESUME_KEYS) too: the checkpoint to resume, or None."""
    benchmark.check_out(args.out, RUN_FILES, args.overwrite, args.resume)
    if not args.resume or not checkpoint_dirs(args.out):
        return
    try:
        with open(os.path.join(args.out, "config.json")) as f:
            was = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: cannot read the run's config in {args.out} ({e}): resume needs its "
                          f"config.json; start afresh with --overwrite") from None

    def place(path, out):  # relative to its run folder when inside it (the demo's model: a moved run matches)
        inside = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
        return os.path.abspath(path) if inside.startswith(os.pardir) else inside
    diff = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run used {was[k]})" for k in RESUME_KEYS
            if k in was and getattr(args, k) != was[k]
            and not (k == "model" and place(args.model, args.out) == place(was[k], was.get("out", args.out)))]
    if diff:
        raise ConfigError(f"--resume: flags differ from the run in {args.out}: {'; '.join(diff)}. Give the run's "
                          f"flags, or start a new run in another --out")
    return resume_checkpoint(args.out, warn)


def claim_out(args):
    """One writer per --out (benchmark.lock_out), every rank writing into rank 0's folder. Returns the resume point."""
    rank, token = dist.get_rank(), os.urandom(8).hex()  # (rank 0's token is the one every rank looks for)

    def lock():
        if rank == 0:
            check_out(args)  # before the lock file is written: a refused run leaves --out as it was
            return benchmark.lock_out(args.out, lambda: check_out(args, warn=True), token)
    shared = [token, together(lock, USER_ERRORS)]
    dist.broadcast_object_list(shared, src=0)

    def sees():  # a node whose --out is not rank 0's folder (a local disk) lacks rank 0's token
        with contextlib.suppress(OSError), open(os.path.join(args.out, benchmark.LOCK_FILE), encoding="utf-8") as f:
            if shared[0] in f.read():
                return
        raise ConfigError(f"rank {rank} on {os.uname().nodename} does not see the run folder rank 0 writes (--out "
                          f"{args.out} lacks rank 0's {benchmark.LOCK_FILE}): give every node the same --out on a "
                          f"filesystem they share")
    together(sees, USER_ERRORS)
    return shared[1]


def check_parse_failures(args, episodes, where):
    """simulator.check_parse_health over every rank; rank 0 shows one bad answer a run (key redacted)."""
    def warn_once(line):
        key = os.environ.get(args.simulator_key_env)
        if dist.get_rank() == 0 and "parse" not in WARNED:
            WARNED.add("parse")
            print(f"rlver: {line.replace(key, '***') if key else line}", flush=True)
    return sim.check_parse_health(episodes, args.max_parse_failure_rate, where, warn_once,
                                  sum_ranks=lambda n: int(all_reduce(n)))


WARNED = set()  # what is warned about once a run: "parse" (an unparseable answer), the COUNTS (log_step)
SIGNALLED = []  # the signal that asked this rank to stop


def on_signal(signum, frame):
    """SIGINT/SIGTERM: finish the step (or the save), save, exit 128 + signal; a second one stops at once."""
    if SIGNALLED:
        interrupted(128 + signum)
    SIGNALLED.append(signum)
    print(f"rlver: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint (a second Ctrl-C "
          f"stops at once, without saving)", flush=True)


def interrupted(code):
    """Stop at once, nothing saved (a save in progress stays a step_N.tmp); os._exit: no wait on HTTP threads."""
    print("rlver: interrupted: stopped at once without saving; --resume continues from the last checkpoint",
          file=sys.stderr, flush=True)
    os._exit(code)


# The training loop and main ---------------------------------------------------------------------------------

def train(args, argv):
    """Setup, then the steps from the start (or the resumed) step on. Returns the exit code."""
    run = setup(args)
    start = start_step(run, args)
    hint = " ".join(argv + ([] if "--resume" in argv else ["--resume"]))  # the command that continues this run
    hint = f"the same torchrun command with {hint}" if dist.get_world_size() > 1 else f"python rlver.py {hint}"
    if dist.get_rank() == 0:  # after the checkpoint loaded: a --resume that fails leaves config.json as it was
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({**vars(args), "world_size": dist.get_world_size(), "device": str(run.device),
                       "torch": torch.__version__}, f, indent=2)
        print(f"rlver: {args.algo} on {args.model} | {dist.get_world_size()} process(es) on {run.device} | "
              f"{len(run.profiles)} train profiles x {args.group_size} rollouts | simulator {args.simulator} "
              f"({args.mode}) | out {args.out}", flush=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    stop_asked = lambda: int(all_reduce(max(SIGNALLED, default=0), dist.ReduceOp.MAX))  # noqa: E731 (0: none)
    done = saved = start  # the last step whose update and metrics are complete; the last checkpointed step
    for step in range(start, args.steps):
        try:
            log_step(args, step, *train_step(run, args, step))
            done = step + 1
            if args.eval_every and done % args.eval_every == 0:
                evaluate_policy(run, args, done)
        except sim.SimulatorError as e:  # the step in progress is dropped: resume replays it exactly
            if done > saved:
                save(run, args, done)
            kept = f"step {done} is saved" if done else "no step was completed"
            raise ConfigError(f"{e}. Stopped: {kept}; after fixing the simulator, continue with: {hint}") from None
        stop_now = stop_asked()
        if done % args.save_every == 0 or done == args.steps or stop_now:
            save(run, args, done)
            saved, stop_now = done, stop_asked()  # one asked during the save: stop right after it
        if stop_now and done < args.steps:  # not 0: a scheduler or an `&&` chain must see an unfinished run
            if dist.get_rank() == 0:
                print(f"rlver: stopped by {signal.Signals(stop_now).name} at step {done} of {args.steps} (saved); "
                      f"continue with: {hint}", file=sys.stderr, flush=True)
            return 128 + stop_now
    if dist.get_rank() == 0:
        print(f"rlver: done. Metrics, transcripts in {args.out}; curves: {os.path.join(args.out, 'curves.svg')}; "
              f"model (HF layout): {checkpoint_dirs(args.out)[-1]}/hf", flush=True)
    return 0


def log_step(args, step, metrics, dialogues):
    """Rank 0: the metrics row, the first LOG_SAMPLES transcripts, the step's line, each count's first warning."""
    metrics["step"] = m = step + 1
    if dist.get_rank() != 0:
        return
    rows = {"metrics.jsonl": [metrics], "samples.jsonl": [
        sim.transcript(d.episode, step=m, policy_texts=d.policy_texts) for d in dialogues[:LOG_SAMPLES]]}
    for name, records in rows.items():
        with open(os.path.join(args.out, name), "a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print("step {step}/{steps} | reward {reward:.3f} ± {reward_std:.3f} | success {success:.2f} fail {failure:.2f} | "
          "turns {turns:.1f} | kl {kl_ref:.4f} clip {clip_frac:.3f} ent {entropy:.2f} | len {policy_tokens:.0f} | "
          "rollout {time_rollout:.1f}s (sim {time_simulator:.1f}s) update {time_update:.1f}s | {gen_tokens_per_s:.0f} "
          "tok/s | parse fail {parse_failed_turns}/{simulator_turns}".format(
              **{"kl_ref": 0.0, "clip_frac": 0.0, "entropy": 0.0, **metrics, "steps": args.steps}), flush=True)
    first = {k: metrics[k] for k in sim.COUNTS if metrics.get(k) and k not in WARNED}  # once a run
    WARNED.update(first)
    for line in sim.count_warnings(first, f"step {m}"):
        print(f"rlver: {line} (warned once; every step's count is in metrics.jsonl)", flush=True)


def main(argv=None):
    args, code = get_args(argv), 2
    try:
        code = train(args, list(sys.argv[1:] if argv is None else argv))
    except USER_ERRORS as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: one line, not one per rank
            print(f"rlver: error: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C before on_signal is installed (setup): stop now
        interrupted(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # files closed; skips the teardown a thread hung on a dead simulator can abort ("terminate called")


if __name__ == "__main__":
    main()
