"""
rlver.py: train an empathetic dialogue policy with RLVER (Wang et al. 2025, arXiv 2507.03112).

    python rlver.py                                   # CPU demo: tiny model + rules simulator, reward rises
    torchrun --nproc_per_node 8 rlver.py --algo grpo --model /models/Qwen2.5-7B-Instruct \
        --simulator http://localhost:8000/v1 --simulator-model Qwen2.5-72B-Instruct

One training step, read top to bottom in train_step():
  1. profiles    step_profiles: this step's share of an epoch-wise shuffle of the training profiles, each
                 repeated group-size times (a whole GRPO group lives on one rank).
  2. rollout     rollout.rollout: each rank talks with its simulated users; the token ids of every turn are
                 carried as sampled, nothing is re-tokenised.
  3. reward      final emotion / 100, the "verifiable emotion reward" (simulator.reward).
  4. score       log-probs of the sampled tokens under the current (old) and the reference policy, and for
                 PPO the critic's values: teacher-forced, micro-batched.
  5. advantages  GRPO: reward against its group of rollouts of the same profile (grpo.group_advantages; under
                 --think-history strip over every turn sample of the group, grpo.sample_group_advantages).
                 PPO: GAE over policy tokens with the critic as baseline (ppo.compute_gae), whitened.
  6. update      clipped surrogate losses, several epochs of micro-batches with gradient accumulation,
                 normalised by the global token count, grad clipping, AdamW.
  7. metrics     step_metrics: means over the global batch.
Around it: torchrun + FSDP2 setup, checkpoints in the HF layout with trainer state (--resume), metrics.jsonl,
sample transcripts, curves.svg, periodic evaluation on the test profiles (benchmark.py), and the guards of a
long run: flags checked before anything is written, a fresh run never mixing with an earlier one, a
simulator that fails or ignores its format stopping the run with the last step saved.
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

import benchmark
import grpo
import model as lm
import ppo
import rollout as ro
import simulator as sim

# ----------------------------------------------------------------------------------------------------------
# Config: every knob is a flag; the resolved config is written to <out>/config.json.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default; a None default is described in the flag's own help text instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv=None):
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items() if k != "think")
    p = argparse.ArgumentParser(description="RLVER: RL with verifiable emotion rewards (PPO / GRPO).",
                                formatter_class=HelpFormatter,
                                epilog=f"Demo mode (no --model): a tiny random model on CPU, and these defaults "
                                       f"instead of the ones above (a flag you give wins): {demo}, --no-think.")
    a = p.add_argument
    a("--algo", choices=["grpo", "ppo"], default="grpo")
    a("--model", default=None, help="local HF checkpoint folder (qwen2/llama/qwen3), or a random-weight smoke run at a "
      f"real size: one of {', '.join(lm.SHAPES)} (made once in <out>/random-NAME); default: a tiny CPU demo model")
    a("--out", default="runs/rlver", help="output dir: config, metrics.jsonl, samples, checkpoints")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    for flags in (environment_flags, training_flags, system_flags):
        flags(a)
    args = p.parse_args(argv)
    if args.group_size is None:
        args.group_size = 4 if args.algo == "grpo" else 1
    if args.max_turns is None:
        args.max_turns = sim.PROTOCOLS[args.protocol].max_turns
    return args


def environment_flags(a):
    """The simulated users, their rules and the policy's turns; the rollout engine."""
    # environment
    a("--simulator", default="rules", help="'rules', an OpenAI-compatible URL, or a local model folder")
    a("--simulator-model", default=None, help="model name sent to an OpenAI-compatible simulator endpoint "
                                               "(default: the first model the endpoint lists)")
    a("--simulator-key-env", default="OPENAI_API_KEY", help="env var holding the simulator endpoint's API key")
    a("--mode", choices=sim.MODES, default="vanilla", help="simulated-user environment: vanilla or challenging")
    a("--train-profiles", default=None, help="profile JSONL (ours or the public RLVER layout); default: built-in")
    a("--test-profiles", default=None, help="profile JSONL for periodic evaluation; default: built-in test set")
    a("--think", action=argparse.BooleanOptionalAction, default=False, help="think-then-say policy template "
      "(official: off)")
    a("--official-prompts", default=None, metavar="DIR", help="play the authors' own simulator and policy prompts, "
      "read from your checkout of their digitalhuman repository (its root, SAGE/ or RLVER/) for --protocol")
    a("--official-quirks", action="store_true", help="with --official-prompts under rlver: every analysis call "
      "sees the start emotion, as the official trainer's code does (the paper: the live emotion)")
    a("--protocol", choices=list(sim.PROTOCOLS), default="rlver", help="dialogue rules (simulator.PROTOCOLS): rlver = "
      "RLVER's training simulator (start 30, two-stage, goodbye ends); sage = SAGE's test loop; classic = ours")
    a("--lang", choices=sim.LANGS, default=None, help="force the template language (default: detected per profile)")
    a("--initial-emotion", type=int, default=None, help="start emotion for profiles without one (default: the "
      "protocol's, rlver 30)")
    a("--max-turns", type=int, default=None, help="scored policy replies per dialogue (default: the protocol's; "
      "rlver 9 = official max_turns 8)")
    a("--max-new-tokens", type=int, default=1024, help="per policy turn (a reply cut here is counted and warned; a "
      "turn starts only while context + this fits --max-context: README)")
    a("--max-context", type=int, default=4096, help="a dialogue that would outgrow this many tokens ends early")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    # rollout engine (rollout.rollout)
    a("--think-history", choices=["keep", "strip"], default="keep",
      help="keep: every thought stays in the context, one training sample per dialogue; strip: earlier "
           "<think> blocks leave the context and each policy turn is its own sample (official think rollout)")
    a("--compile", action="store_true", help="torch.compile the rollout's decode step (CUDA graphs on GPU)")
    a("--no-kv-reuse", action="store_true", help="ablation: re-prefill the whole conversation every turn")
    a("--no-overlap", action="store_true",
      help="ablation: lockstep turns (all dialogues decode, then the simulator answers all of them)")


def training_flags(a):
    """Batch and optimisation: the official RLVER config where it has one (README table)."""
    # batch
    a("--steps", type=int, default=200)
    a("--profiles-per-step", type=int, default=32, help="global number of profiles per step")
    a("--group-size", type=int, default=None, help="rollouts per profile (default: 4 for grpo, 1 for ppo)")
    a("--micro-batch", type=int, default=4, help="dialogues per forward/backward")
    a("--mini-batches", type=int, default=1, help="optimizer steps per epoch")
    a("--epochs", type=int, default=1, help="passes over each step's rollouts")
    # optimisation
    a("--lr", type=float, default=1e-6)
    a("--critic-lr", type=float, default=5e-6)
    a("--warmup-ratio", type=float, default=0.02, help="actor LR warmup as a fraction of --steps (official 0.02)")
    a("--critic-warmup-ratio", type=float, default=0.05, help="critic LR warmup fraction of --steps (official 0.05)")
    a("--warmup-steps", type=int, default=0, help="> 0: warmup steps for both, instead of the ratios")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=1.0)
    a("--clip-low", type=float, default=0.2)
    a("--clip-high", type=float, default=0.2, help="> clip-low gives DAPO's clip-higher")
    a("--dual-clip", type=float, default=None, help="dual-clip constant c > 1 (e.g. 3); off by default")
    a("--value-clip", type=float, default=0.5)
    a("--kl-coef", type=float, default=0.0, help="GRPO: k3 KL in the loss; PPO: k1 KL in the reward; 0 (official): "
      "no reference model is built")
    a("--entropy-coef", type=float, default=0.001, help="entropy bonus: loss -= coef x mean policy entropy")
    a("--gamma", type=float, default=1.0)
    a("--lam", type=float, default=1.0)
    a("--no-std", action="store_true", help="GRPO without dividing by the group std (Dr.GRPO)")
    a("--loss-agg", choices=["token-mean", "seq-mean-token-mean"], default="token-mean")


def system_flags(a):
    """Devices, checkpoints, logging, and the safety rails of a run."""
    # system
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="compute dtype; auto = bf16 on GPU, fp32 on CPU. Parameters and AdamW state are fp32 either way")
    a("--no-fsdp", action="store_true", help="single process without FSDP (plain module)")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="recompute each decoder block in backward instead of keeping its activations (default: on on CUDA, "
           "where 7B at --micro-batch 4 x 4k tokens needs it; off on CPU)")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    a("--keep-checkpoints", type=int, default=2)
    a("--eval-every", type=int, default=0, help="evaluate on the test profiles every N steps (0: never)")
    a("--eval-profiles", type=int, default=32, help="test profiles per evaluation")
    a("--log-samples", type=int, default=2, help="transcripts written to samples.jsonl per step")
    # safety: runs never mix, a bad simulator stops the run, CPU threads
    a("--overwrite", action="store_true",
      help="start afresh in an --out that holds an earlier run (its checkpoints, metrics, samples, eval, curves "
           "are deleted); without it such an --out is refused unless --resume")
    a("--max-parse-failure-rate", type=float, default=0.5,
      help="stop (last step checkpointed) when more than this share of a step's simulator turns is unparseable")
    a("--simulator-timeout", type=float, default=120.0, help="seconds per HTTP request to a simulator endpoint")
    a("--simulator-retries", type=int, default=4, help="retries per simulator endpoint request (429/5xx/timeouts)")
    a("--simulator-turn-deadline", type=float, default=600.0,
      help="seconds for all simulator answers of one turn; past it the run stops (last step checkpointed)")
    a("--threads", type=int, default=CPU_THREADS, help="CPU runs: torch threads per process (see README: speed)")


# torch threads per process on CPU. Measured with the demo (README, "CPU threads"): 1 thread is a little
# slower than 2 on a quiet 2-core box but several times faster when anything else wants the CPU (OpenMP
# workers then wait for a descheduled sibling at every op).
CPU_THREADS = 1

DEMO = dict(  # `python rlver.py` with no --model: everything small enough for a laptop CPU
    steps=30, profiles_per_step=8, max_turns=3, max_new_tokens=24, micro_batch=16, lr=1e-2, critic_lr=1e-2, warmup_steps=0,
    out="runs/demo", save_every=10, think=False, eval_every=15, eval_profiles=8,
    protocol="classic", entropy_coef=0.0, weight_decay=0.0)  # our English rules users, no extra terms


class ConfigError(ValueError):
    """A bad flag or path: reported as one line before any heavy work."""


def apply_demo_defaults(args, argv):
    """With no --model we train a tiny random model (made on the spot) for a few minutes on CPU."""
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
    for key, value in DEMO.items():
        if key not in given and not (key == "think" and "no_think" in given):
            setattr(args, key, value)
    args.model = os.path.join(args.out, "tiny-qwen2")


# Every numeric flag by its allowed range (checked before anything is written)
AT_LEAST_1 = ("steps", "profiles_per_step", "group_size", "max_turns", "max_new_tokens", "micro_batch",
              "mini_batches", "epochs", "save_every", "keep_checkpoints", "eval_profiles", "threads")
AT_LEAST_0 = ("warmup_steps", "eval_every", "log_samples", "simulator_retries", "weight_decay", "clip_low",
              "clip_high", "value_clip", "kl_coef", "gamma", "lam", "max_parse_failure_rate")
ABOVE_0 = ("lr", "critic_lr", "grad_clip", "temperature", "top_p", "simulator_timeout", "simulator_turn_deadline")
AT_MOST_1 = ("top_p", "gamma", "lam", "max_parse_failure_rate")
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "eval", "curves.svg")  # what a run writes in --out


def flag(name):
    return "--" + name.replace("_", "-")


def check_numbers(args):
    """Every numeric flag in its range (a NaN fails every comparison, so it is caught too)."""
    for name in AT_LEAST_1 + AT_LEAST_0 + ABOVE_0:
        value = getattr(args, name)
        if not math.isfinite(value):
            raise ConfigError(f"{flag(name)} {value}: give a finite number")
    for names, ok, rule in ((AT_LEAST_1, lambda v: v >= 1, ">= 1"), (AT_LEAST_0, lambda v: v >= 0, ">= 0"),
                            (ABOVE_0, lambda v: v > 0, "> 0"), (AT_MOST_1, lambda v: v <= 1, "<= 1")):
        for name in names:
            if not ok(getattr(args, name)):
                raise ConfigError(f"{flag(name)} {getattr(args, name)}: must be {rule}")
    if args.dual_clip is not None and not args.dual_clip > 1:
        raise ConfigError(f"--dual-clip {args.dual_clip}: must be > 1 (e.g. 3), or leave it out")


def check_out(args):
    """--out is a folder we may write, and a fresh run never mixes with (or silently deletes) an earlier one."""
    if benchmark.blocking_file(args.out):
        raise ConfigError(f"--out {args.out}: {benchmark.blocking_file(args.out)} is a file, not a folder: "
                          f"choose another --out")
    old = [n for n in RUN_FILES if os.path.exists(os.path.join(args.out, n))]
    if old and not args.resume and not args.overwrite:
        raise ConfigError(f"--out {args.out} holds an earlier run ({', '.join(old)}): continue it with --resume, "
                          f"replace it with --overwrite, or choose another --out")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: give one")


# Settings a resumed run must share with the run it continues (independent of the number of processes).
RESUME_KEYS = ("algo", "model", "train_profiles", "profiles_per_step", "group_size", "mini_batches", "epochs",
               "seed", "think", "mode", "official_prompts", "official_quirks")


def run_path(path, out):
    """A path as its run sees it: relative to --out when it lies inside (the demo's model, a random-NAME
    checkpoint: a moved or copied run folder still matches), else absolute."""
    inside = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return os.path.abspath(path) if inside.startswith(os.pardir) else inside


def check_resume(args):
    """--resume continues the run in --out: refuse flags that would change what is being trained. Returns
    resume_checkpoint's (checkpoint to resume from or None, damaged newer ones)."""
    if not args.resume or not checkpoint_dirs(args.out):
        return None, []
    try:
        with open(os.path.join(args.out, "config.json")) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: cannot read the run's config in {args.out} ({e}): resume needs its "
                          f"config.json; start afresh with --overwrite") from None
    def same(key, new, was):  # a model path may be given relative or absolute, the run folder may have moved
        if key == "model" and new and was:
            return run_path(new, args.out) == run_path(was, old.get("out", args.out))
        return new == was

    diff = [f"{flag(k)} {getattr(args, k)} (the run used {old[k]})"
            for k in RESUME_KEYS if k in old and not same(k, getattr(args, k), old[k])]
    if diff:
        raise ConfigError(f"--resume: flags differ from the run in {args.out}: {'; '.join(diff)}. Give the run's "
                          f"flags, or start a new run in another --out")
    return resume_checkpoint(args.out)


def validate_args(args, world):
    """Everything a user can get wrong on the command line, checked before anything is written."""
    check_numbers(args)
    if args.algo == "grpo" and args.group_size < 2:
        raise ConfigError("--group-size must be >= 2 for grpo (the baseline is the group's mean reward)")
    if args.profiles_per_step % world:
        raise ConfigError(f"--profiles-per-step {args.profiles_per_step} must be divisible by the number of "
                          f"processes ({world})")
    per_rank = args.profiles_per_step // world * args.group_size
    if per_rank % args.mini_batches:
        raise ConfigError(f"{per_rank} dialogues per process cannot be split into --mini-batches "
                          f"{args.mini_batches}")
    if args.max_context <= args.max_new_tokens:
        raise ConfigError("--max-context must exceed --max-new-tokens")
    if args.initial_emotion is not None and not 1 <= args.initial_emotion <= 99:
        raise ConfigError("--initial-emotion must be in 1..99")
    if not (0 <= args.warmup_ratio < 1 and 0 <= args.critic_warmup_ratio < 1) or args.entropy_coef < 0:
        raise ConfigError("--warmup-ratio / --critic-warmup-ratio must be in [0, 1) and --entropy-coef >= 0")
    if args.no_fsdp and world > 1:
        raise ConfigError("--no-fsdp is for a single process; drop it under torchrun")


def validate_model(args, profiles):
    """The checkpoint (config and safetensors headers, no tensors read) and whether its prompts fit --max-context.
    Returns (config, tokenizer)."""
    cfg = lm.read_config(args.model)  # raises CheckpointError with the fix
    lm.check_weights(args.model)  # a truncated or corrupt *.safetensors, found in milliseconds
    tokenizer = lm.load_tokenizer(args.model)
    # the first prompt of each dialogue: a profile without an opening line gets one from the simulator later,
    # so only its system prompt is measured here
    profiles = [sim.resolve_profile(p, args.protocol, args.lang, args.initial_emotion) for p in profiles]
    longest = max(len(tokenizer.encode(ro.render(tokenizer, [{"role": "system", "content": ro.system_prompt(
        args.think, p.lang, p.prompts)}, {"role": "user", "content": p.opening or ""}], True), add_special_tokens=False))
        for p in profiles)
    if longest + args.max_new_tokens > args.max_context:
        raise ConfigError(f"--max-context {args.max_context} leaves no room for a turn: the longest opening prompt "
                          f"is {longest} tokens plus --max-new-tokens {args.max_new_tokens}; give --max-context "
                          f">= {longest + args.max_new_tokens}")
    return cfg, tokenizer


# ----------------------------------------------------------------------------------------------------------
# Distributed setup: one process per device (torchrun), FSDP2 shards parameters, grads and optimizer state.


def setup_distributed():
    """Join torchrun's process group (or make a group of one), pick the device. Returns rank, world, device."""
    if "RANK" not in os.environ:  # plain `python rlver.py`: a process group of one, same code path
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        with socket.socket() as free:  # any free port for the group of one
            free.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_PORT", str(free.getsockname()[1]))
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # a backend per device: NCCL for CUDA tensors, gloo for the CPU tensors of the metric and object gathers
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def together(fn, catch):
    """fn() on every rank; when it raised one of `catch` on any rank, every rank raises the first such error
    (ranks in order), so no rank is left waiting in a collective for one that stopped. Returns fn()'s result."""
    result, error = None, None
    try:
        result = fn()
    except catch as e:
        error = e
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return result


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
        if state:  # (the critic has no output head: ppo.Critic)
            state = {f"backbone.{k}": v for k, v in state.items() if k != "lm_head.weight"}
            state.update({"value_head.weight": head.weight.data, "value_head.bias": head.bias.data})
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    policy.reset_rope(device)
    return module


@contextlib.contextmanager
def generation_mode(model):
    """
    Unshard the policy once for the whole rollout phase instead of all-gathering every layer for every
    decoded token. All ranks all-gather together on entry; after that a forward needs no collective, so
    ranks may run different numbers of decode steps (their dialogues end at different turns).
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.unshard()  # (not recursive: every block and the root)
    if fsdp_modules:
        model.set_reshard_after_forward(False)
    model.eval()
    try:
        yield
    finally:
        if fsdp_modules:
            model.set_reshard_after_forward(True)
        for m in fsdp_modules:
            m.reshard()
        model.train()


# ----------------------------------------------------------------------------------------------------------
# The run: models, optimizers and the environment, built once by setup()


@dataclass
class Run:
    device: torch.device
    tokenizer: object
    eos_ids: list  # token ids that end a policy turn (model.stop_token_ids)
    profiles: list  # training profiles (simulator.Profile)
    test_profiles: list
    backend: object  # the simulated user (simulator.make_backend)
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    reference: torch.nn.Module = None  # frozen initial policy; only when --kl-coef > 0
    critic: torch.nn.Module = None  # PPO only
    critic_optimizer: torch.optim.Optimizer = None
    critic_scheduler: object = None

    def trained(self):
        """(name, model, optimizer, scheduler) of what this run trains: the policy, and the PPO critic."""
        out = [("policy", self.policy, self.optimizer, self.scheduler)]
        if self.critic is not None:
            out.append(("critic", self.critic, self.critic_optimizer, self.critic_scheduler))
        return out


# ----------------------------------------------------------------------------------------------------------
# One training step


def step_profiles(n_profiles, per_step, step, seed):
    """
    Indices of the `per_step` profiles of a step. The training set is visited epoch by epoch, each epoch in
    its own shuffled order, so every epoch sees each profile exactly once; a step that straddles an epoch
    boundary takes the end of one epoch's order and the start of the next's.
    """
    orders = {}
    chosen = []
    for g in range(step * per_step, (step + 1) * per_step):  # global position in the stream of profiles
        epoch, position = divmod(g, n_profiles)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n_profiles, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        chosen.append(orders[epoch][position])
    return chosen


def train_step(run, args, step):
    """One RLVER step: profiles -> rollout -> reward -> score -> advantages -> update -> metrics."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = args.profiles_per_step // world
    mine = step_profiles(len(run.profiles), args.profiles_per_step, step, args.seed)[rank * share:(rank + 1) * share]
    first = rank * share * args.group_size  # global index of this rank's first dialogue
    seeds = [ro.rollout_seed(args.seed, step, first + j) for j in range(share * args.group_size)]

    timing, t0 = {}, time.time()
    peak_memory_gb(run.device)  # (resets the peak)
    dialogues = play(run, args, [run.profiles[i] for i in mine], args.group_size, seeds, args.temperature, timing)
    timing["rollout"] = time.time() - t0
    peaks = {"peak_gb_rollout": peak_memory_gb(run.device)}
    failures = check_parse_failures(args, [d.episode for d in dialogues], f"step {step + 1}")  # before any update

    t0 = time.time()
    rewards = torch.tensor([sim.reward(d.episode) for d in dialogues], device=run.device)  # (B,)
    batch = score_rollouts(run, args, ro.training_samples(dialogues))
    batch["advantages"] = advantages(run, args, batch, rewards)
    stats = update(run, batch, args, step)
    timing["update"] = time.time() - t0
    peaks["peak_gb_update"] = peak_memory_gb(run.device)
    metrics = step_metrics(run, args, dialogues, rewards, batch, stats, timing)
    metrics["parse_failed_turns"], metrics["simulator_turns"] = failures
    if run.device.type == "cuda":  # the largest rank's peak GPU memory per phase
        metrics.update({k: all_reduce(v, dist.ReduceOp.MAX) for k, v in peaks.items()})
    if args.compile:  # dynamo's counters so far on this rank: one compile per (dialogue count, bucket) expected
        from torch._dynamo.utils import counters
        metrics.update(compiles=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                       cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    return metrics, dialogues


def peak_memory_gb(device):
    """The peak GPU memory allocated since the last call, in GB (then reset); None on CPU."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def played_profiles(run, args, profiles):
    """The profiles under --protocol / --lang / --initial-emotion, the simulator writing missing openings."""
    return sim.prepare_profiles(profiles, run.backend, protocol=args.protocol, mode=args.mode, lang=args.lang,
                                initial_emotion=args.initial_emotion)


def play(run, args, profiles, group, seeds, temperature, timing=None):
    """The rollout phase: each profile prepared (played_profiles: an opening the simulator writes is shared by
    the profile's group) and played `group` times, the policy unsharded once (generation_mode). A simulator
    failure (retries spent, deadline passed) on any rank stops every rank together, each with the failing
    rank's message, so no rank is left waiting in a collective while the others save."""
    log = (lambda line: print(line, flush=True)) if dist.get_rank() == 0 else None
    error, dialogues = None, None
    with generation_mode(run.policy):
        try:
            profiles = [p for p in played_profiles(run, args, profiles) for _ in range(group)]
            dialogues = ro.rollout(run.policy, run.tokenizer, profiles, run.backend, seeds=seeds, think=args.think,
                                   think_history=args.think_history, max_turns=args.max_turns,
                                   max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                                   mode=args.mode, max_context=args.max_context, eos_ids=run.eos_ids,
                                   timing=timing, log=log, kv_reuse=not args.no_kv_reuse,
                                   overlap=not args.no_overlap, compile=args.compile,
                                   turn_deadline=args.simulator_turn_deadline)
        except sim.SimulatorError as e:
            error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        raise sim.SimulatorError(next(e for e in errors if e))
    return dialogues


def micro_batches(rows, size, ids, lengths):
    """(rows, ids[rows]) per micro-batch of `size` rows, the ids cut to the longest of those rows: (b, T_rows)."""
    for i in range(0, len(rows), size):
        part = rows[i:i + size]
        yield part, ids[part, :max(lengths[r] for r in part)]


def pad_samples(samples, pad_id):
    """Under --think-history strip ranks hold different numbers of turn samples; FSDP needs every rank to run
    the same micro-batches, so the short ranks get empty samples (no policy token: no loss, no count)."""
    most = int(all_reduce(len(samples), dist.ReduceOp.MAX))
    return samples + [ro.Sample([pad_id, pad_id], [False, False], 0)] * (most - len(samples))


def reuses_update_forward(run, args):
    """One epoch of one mini-batch: pi_old is the policy of the update's own (first and only) forward, so
    the scoring pass is skipped and the update uses its detached log-probs (ratio 1). Not for PPO with a
    KL reward: the advantages need pi_old before the update."""
    return args.epochs == 1 and args.mini_batches == 1 and (args.algo == "grpo" or run.reference is None)


@torch.no_grad()
def score_rollouts(run, args, samples):
    """The batch of one step from its training samples (rollout.Sample: one per dialogue, or one per turn
    under --think-history strip): ids (B, T), mask (B, T-1), dialogue (B,) (whose reward each row carries),
    and per token the log-probs under pi_old (unless reuses_update_forward) and pi_ref and (PPO) the
    critic's values, all (B, T-1) and aligned with the targets ids[:, 1:]. Teacher-forced, micro-batched,
    each micro-batch cut to its longest row."""
    samples = pad_samples(samples, run.tokenizer.pad_token_id)
    ids, mask = ro.collate(samples, run.tokenizer.pad_token_id, run.device)
    lengths = [len(s.ids) for s in samples]
    batch = {"ids": ids, "mask": mask, "lengths": lengths,
             "dialogue": torch.tensor([s.dialogue for s in samples], device=run.device)}
    for key, model in (("old_logprobs", run.policy), ("ref_logprobs", run.reference), ("old_values", run.critic)):
        if model is None or (key == "old_logprobs" and reuses_update_forward(run, args)):
            continue
        batch[key] = torch.zeros(mask.shape, device=mask.device)  # (B, T-1)
        for rows, x in micro_batches(list(range(len(ids))), args.micro_batch, ids, lengths):
            y = model(x) if key == "old_values" else lm.token_logprobs(model, x, args.temperature)
            batch[key][rows, :y.shape[1]] = y.float()
    return batch


def sum_over_ranks(t):
    """A tensor summed over every process (the `reduce` hook of ppo.masked_mean / masked_whiten)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def advantages(run, args, batch, rewards):
    """(B, T-1) advantages on the policy tokens; rewards (dialogues,), each row takes its dialogue's. GRPO: the
    group-relative advantage of the whole dialogue (computed per dialogue within its group; under
    --think-history strip over all turn samples of the group, as the official think trainer) on each token.
    PPO: the dialogue's reward on each sample's last policy token, GAE per sample with the critic's values,
    whitened over the policy tokens of all ranks."""
    mask, dialogue = batch["mask"], batch["dialogue"]
    if args.algo == "grpo" and args.think_history == "strip":  # over every turn sample of a group (grpo.py)
        adv = grpo.sample_group_advantages(rewards[dialogue], dialogue // args.group_size, mask.any(1),
                                           scale_by_std=not args.no_std)  # (samples,)
        return adv[:, None] * mask
    if args.algo == "grpo":
        group = grpo.group_advantages(rewards, args.group_size, scale_by_std=not args.no_std)  # (dialogues,)
        return group[dialogue][:, None] * mask
    kl_coef = args.kl_coef if "ref_logprobs" in batch else 0.0
    token_rewards = ppo.token_rewards(rewards[dialogue], mask, batch.get("old_logprobs"), batch.get("ref_logprobs"),
                                      kl_coef)
    adv, batch["returns"] = ppo.compute_gae(token_rewards, batch["old_values"], mask, args.gamma, args.lam)
    return ppo.masked_whiten(adv, mask, reduce=sum_over_ranks)


def optimizer_step(model, optimizer, grad_clip):
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def shuffle_seed(seed, step, epoch):
    """The mini-batch shuffle's seed per (run seed, step, epoch): mixed like rollout.rollout_seed, salted so
    it is not the seed of any dialogue's stream."""
    return ro.rollout_seed(seed + 7_919, step, epoch)


def update(run, batch, args, step):
    """--epochs passes of clipped-surrogate updates over this step's rollouts, --mini-batches optimizer
    steps each (and the same for the PPO critic). Returns the step's update metrics (update_metrics)."""
    ids, mask, lengths = batch["ids"], batch["mask"], batch["lengths"]
    world, B = dist.get_world_size(), len(ids)
    reuse = "old_logprobs" not in batch  # reuses_update_forward: pi_old = this forward, filled in as we go
    if reuse:
        batch["old_logprobs"] = torch.zeros(mask.shape, device=mask.device)  # (B, T-1)
    sums = {}
    for epoch in range(args.epochs):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(shuffle_seed(args.seed, step, epoch)))
        for mini in order.tensor_split(args.mini_batches):
            mini = mini.tolist()
            # Normalise by the GLOBAL count (every micro-batch on every rank) / world: FSDP averages gradients
            # over ranks, so the total gradient is that of sum(per-token loss) / N_global (see ppo.aggregate).
            scale = dict(agg=args.loss_agg, loss_scale_tokens=all_reduce(mask[mini].sum()) / world,
                         loss_scale_seqs=all_reduce((mask[mini].sum(1) > 0).sum()) / world)
            for rows, x in micro_batches(mini, args.micro_batch, ids, lengths):
                mb = {k: v[rows, :x.shape[1] - 1] for k, v in batch.items() if k not in ("ids", "lengths", "dialogue")}
                logprobs, entropy = lm.token_logprobs(run.policy, x, args.temperature, return_entropy=True)
                if reuse:  # ratio exactly 1 on this (only) pass
                    mb["old_logprobs"] = batch["old_logprobs"][rows, :logprobs.shape[1]] = logprobs.detach()
                if args.algo == "grpo":
                    loss, metrics = grpo.grpo_loss(logprobs, mb["old_logprobs"], mb.get("ref_logprobs"),
                                                   mb["advantages"], mb["mask"], args.clip_low, args.clip_high,
                                                   args.kl_coef, dual_clip=args.dual_clip, **scale)
                else:  # the critic shares no parameter with the policy: one backward serves both losses
                    loss, metrics = ppo.policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                                    args.clip_low, args.clip_high, args.dual_clip, **scale)
                    vloss, vmetrics = ppo.value_loss(run.critic(x), mb["old_values"], mb["returns"], mb["mask"],
                                                     args.value_clip, **scale)
                    metrics.update(vmetrics, loss=loss.detach())
                    loss = loss + vloss
                if args.entropy_coef:  # entropy bonus (official 0.001), aggregated like the policy loss
                    loss = loss - args.entropy_coef * ppo.aggregate(entropy, mb["mask"], **scale)
                loss.backward()
                metrics["entropy"] = ppo.masked_mean(entropy.detach(), mb["mask"])
                accumulate(sums, metrics, mb["mask"].sum().item())
            for name, model, optimizer, _ in run.trained():
                key = "grad_norm" if name == "policy" else "critic_grad_norm"
                sums[key] = sums.get(key, 0.0) + optimizer_step(model, optimizer, args.grad_clip)
    for _, _, _, scheduler in run.trained():
        scheduler.step()
    return update_metrics(sums, args.epochs * args.mini_batches)


SUMMED = ("loss", "policy_loss", "value_loss")  # micro-batch losses already / N_global: they add up, not average
GRAD_NORMS = ("grad_norm", "critic_grad_norm")  # one value per optimizer step


def accumulate(sums, metrics, n_tokens):
    """Add one micro-batch's metrics: the losses as they are, every other metric weighted by its tokens."""
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k in SUMMED else n_tokens)
    sums["_tokens"] = sums.get("_tokens", 0.0) + n_tokens


def update_metrics(sums, n_updates):
    """The step's update metrics over all ranks: losses = the global loss averaged over the optimizer steps;
    grad_norm / critic_grad_norm = the mean over the step's optimizer steps (this rank's, equal on all ranks
    under FSDP); every other metric = token-weighted mean over the global batch."""
    world, tokens = dist.get_world_size(), all_reduce(sums.pop("_tokens"))
    out = {}
    for k, v in sums.items():
        if k in GRAD_NORMS:
            out[k] = v / n_updates
        elif k in SUMMED:
            out[k] = all_reduce(v) / (world * n_updates)
        else:
            out[k] = all_reduce(v) / max(tokens, 1)
    return out


def step_metrics(run, args, dialogues, rewards, batch, stats, timing):
    """One metrics.jsonl row: the update's metrics plus means over the global batch of dialogues."""
    episodes = [d.episode for d in dialogues]
    n = all_reduce(len(dialogues))
    mean = lambda xs: all_reduce(sum(xs)) / n  # noqa: E731
    reward = mean(rewards.tolist())
    slowest = lambda key: all_reduce(timing.get(key, 0.0), dist.ReduceOp.MAX)  # noqa: E731
    metrics = dict(stats)
    real = batch["mask"].sum(1) > 0  # (B,) samples with policy tokens
    samples = all_reduce(float(real.sum()))
    if "ref_logprobs" in batch:  # k1 estimate of KL(pi_old || pi_ref) over the global batch's policy tokens
        metrics["kl_ref"] = ppo.masked_mean(batch["old_logprobs"] - batch["ref_logprobs"], batch["mask"],
                                            reduce=sum_over_ranks).item()
    metrics.update(
        reward=reward, reward_std=math.sqrt(max(mean([r * r for r in rewards.tolist()]) - reward ** 2, 0.0)),
        emotion=100 * reward,
        success=mean([sim.final_outcome(e.emotion, e.profile.protocol) == "success" for e in episodes]),
        failure=mean([sim.final_outcome(e.emotion, e.profile.protocol) == "failure" for e in episodes]),
        turns=mean([len(e.turns) for e in episodes]),
        truncated=mean([d.truncated for d in dialogues]),
        parse_failures=mean([e.parse_failures for e in episodes]),
        policy_tokens=mean([sum(d.policy_mask) for d in dialogues]),
        seq_len=all_reduce(sum(n for n, r in zip(batch["lengths"], real.tolist()) if r)) / max(samples, 1),
        samples=samples,  # training sequences with policy tokens (pad_samples' empty ones do not count)
        prefill_tokens=all_reduce(timing.get("prefill_tokens", 0)),  # what the rollout engine fed the model
        conversation_tokens=all_reduce(timing.get("conversation_tokens", 0)),  # the conversations' own length
        decode_steps=slowest("decode_steps"),
        active_rows=all_reduce(timing.get("active_rows", 0)) / max(all_reduce(timing.get("decode_steps", 0)), 1),
        time_rollout=slowest("rollout"), time_generate=slowest("generate"), time_simulator=slowest("simulator"),
        time_update=slowest("update"),
        gen_tokens_per_s=all_reduce(timing.get("tokens", 0) / max(timing.get("generate", 1e-9), 1e-9)),
        lr=run.optimizer.param_groups[0]["lr"],
        **{k: all_reduce(sum(getattr(e, k) for e in episodes)) for k in sim.COUNTS},  # totals, warned per step
    )
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoints/step_N/{hf/ (HF layout, loadable by transformers), trainer/ (sharded state)}


def checkpoint_dirs(out):
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    # only complete checkpoints: step_N with DONE; a step_N.tmp (killed mid-save, even after DONE) is ignored
    steps = [int(n[5:]) for n in os.listdir(root)
             if re.fullmatch(r"step_\d+", n) and os.path.isfile(os.path.join(root, n, "DONE"))]
    return [os.path.join(root, f"step_{s}") for s in sorted(steps)]


def trainer_state(run):
    """What --resume needs: model and optimizer state of the policy (and critic), sharded, for DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, model, optimizer, _ in run.trained():
        state[name], state[f"{name}_optimizer"] = get_state_dict(model, optimizer)
    return state


def save_checkpoint(run, args, step):
    """Written to step_N.tmp and renamed when complete: a kill mid-save never leaves a broken checkpoint. Every
    rank writes its shard of trainer/ (DCP), rank 0 the rest. A failed write on any rank (a full disk: ENOSPC,
    or any OSError) removes the .tmp, keeps every earlier checkpoint and stops the run with one line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from safetensors import SafetensorError

    failed = (OSError, SafetensorError)  # safetensors reports a full disk as its own error
    rank = dist.get_rank()
    final = os.path.join(args.out, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    state = trainer_state(run)

    def start():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    def save_hf(full):  # hf/: in the source checkpoint's dtype (save_model), with its sampling and stop-token defaults
        lm.save_model(full, run.policy.config, os.path.join(tmp, "hf"), run.tokenizer)
        if os.path.isfile(os.path.join(args.model, "generation_config.json")):
            shutil.copy(os.path.join(args.model, "generation_config.json"), os.path.join(tmp, "hf"))

    def finish():
        torch.save({name: scheduler.state_dict() for name, _, _, scheduler in run.trained()},
                   os.path.join(tmp, "schedulers.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "algo": args.algo, "world_size": dist.get_world_size()}, f)
        open(os.path.join(tmp, "DONE"), "w").close()
        shutil.rmtree(final, ignore_errors=True)  # (a damaged checkpoint of this step, redone after --resume)
        os.replace(tmp, final)
        for old in checkpoint_dirs(args.out)[:-args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    try:  # each `together` is also the barrier between the ranks' parts
        together(lambda: rank == 0 and start(), failed)
        full = get_model_state_dict(run.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        together(lambda: rank == 0 and save_hf(full), failed)
        del full
        dcp.save(state, checkpoint_id=os.path.join(tmp, "trainer"))  # a failed shard raises on every rank
        together(lambda: rank == 0 and finish(), failed)
    except (*failed, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        e = rank_error(e)
        need = state_bytes(state) + sum(p.numel() * 4 for p in run.policy.parameters())  # + hf/, at most fp32
        free = shutil.disk_usage(os.path.dirname(final)).free
        raise ConfigError(f"saving {tmp} failed ({getattr(e, 'strerror', None) or e}): a checkpoint needs up to "
                          f"{need / 2**20:.1f} MiB free on that disk ({free / 2**20:.1f} MiB free now); the .tmp is "
                          f"removed and every earlier checkpoint kept: free space, then continue with "
                          f"--resume") from None
    return final


def rank_error(e):
    """The error behind DCP's CheckpointException (the first failing rank's own), else e itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    return next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e


def state_bytes(state):
    """Bytes of every tensor in a nested state dict (a DTensor counts its whole, unsharded size)."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    return state.numel() * state.element_size() if torch.is_tensor(state) else 0


def checkpoint_problem(path):
    """Why a checkpoint with DONE cannot be resumed, or None: its small files must read and every trainer shard
    the DCP metadata names must be on disk at full length (no tensor is loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        with open(os.path.join(path, "state.json")) as f:
            json.load(f)
        torch.load(os.path.join(path, "schedulers.pt"), weights_only=False)
        storage = FileSystemReader(os.path.join(path, "trainer")).read_metadata().storage_data or {}
        for info in storage.values():
            shard = os.path.join(path, "trainer", info.relative_path)
            if os.path.getsize(shard) < info.offset + info.length:
                return f"{shard} is truncated"
    except Exception as e:  # noqa: BLE001 (unreadable in any way is damaged: OSError, pickle, JSON, zip errors)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def resume_checkpoint(out):
    """(the newest checkpoint --resume can read (checkpoint_problem) or None when there is none, a line for
    each damaged newer one: it is left in place). ConfigError when none is readable."""
    dirs, damaged = checkpoint_dirs(out), []
    for path in reversed(dirs):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append(f"{path} is damaged ({problem})")
    if dirs:
        raise ConfigError(f"--resume: no checkpoint in {out}/checkpoints is readable ({'; '.join(damaged)}): start "
                          f"afresh with --overwrite, or in another --out")
    return None, []


def load_checkpoint(run, path):
    """Restore models, optimizers and schedulers in place; returns the checkpoint's step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = trainer_state(run)
    dcp.load(state, checkpoint_id=os.path.join(path, "trainer"))
    schedulers = torch.load(os.path.join(path, "schedulers.pt"), weights_only=False)
    for name, model, optimizer, scheduler in run.trained():
        set_state_dict(model, optimizer, model_state_dict=state[name], optim_state_dict=state[f"{name}_optimizer"])
        scheduler.load_state_dict(schedulers[name])
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)["step"]


# ----------------------------------------------------------------------------------------------------------
# Simulator health: unparseable simulator answers (simulator.check_parse_failures) are counted on every
# step's line, shown once, and stop the run past --max-parse-failure-rate.


def check_parse_failures(args, episodes, where):
    """simulator.check_parse_failures over the global batch: every rank decides alike (no rank is left
    waiting); rank 0 shows one offending answer, once per run, with the simulator's key redacted. Returns
    (unparseable simulator turns, simulator turns) over every rank, for the step's metrics."""
    failed, total, example = sim.parse_failure_stats(episodes)
    failed, total = int(all_reduce(failed)), int(all_reduce(total))

    def warn_once(line):
        key = os.environ.get(args.simulator_key_env)
        if dist.get_rank() == 0 and not WARNED:
            WARNED.append(line)
            print(f"rlver: {line.replace(key, '***') if key else line}", flush=True)

    sim.check_parse_failures(failed, total, example, args.max_parse_failure_rate, where, warn_once)
    return failed, total


WARNED = []  # the first unparseable answer is shown once per run


# ----------------------------------------------------------------------------------------------------------
# Logging


def log_line(m, total_steps):
    return (f"step {m['step']}/{total_steps} | reward {m['reward']:.3f} ± {m['reward_std']:.3f} | "
            f"success {m['success']:.2f} fail {m['failure']:.2f} | turns {m['turns']:.1f} | "
            f"kl {m.get('kl_ref', 0.0):.4f} clip {m.get('clip_frac', 0.0):.3f} "
            f"ent {m.get('entropy', 0.0):.2f} | len {m['policy_tokens']:.0f} | "
            f"rollout {m['time_rollout']:.1f}s (sim {m['time_simulator']:.1f}s) update {m['time_update']:.1f}s | "
            f"{m['gen_tokens_per_s']:.0f} tok/s | parse fail {m['parse_failed_turns']}/{m['simulator_turns']}")


def append_jsonl(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def truncate_jsonl(path, step):
    """On resume, drop rows (metrics, sample transcripts) of steps after the checkpoint: they are redone. A
    torn line (a run killed while writing it) is dropped with a warning."""
    if os.path.isfile(path):
        keep = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    print(f"rlver: warning: --resume: {path}:{n} is torn (not a JSON row): dropped", flush=True)
                    continue
                if row.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        with open(path, "w") as f:
            f.writelines(keep)


# ----------------------------------------------------------------------------------------------------------
# Evaluation on the test profiles (greedy), each rank its share; benchmark.py writes the report.


def evaluate_policy(run, args, step):
    rank, world = dist.get_rank(), dist.get_world_size()
    profiles = run.test_profiles[:args.eval_profiles]
    lo, hi = rank * len(profiles) // world, (rank + 1) * len(profiles) // world  # contiguous: keeps order
    dialogues = play(run, args, profiles[lo:hi], 1, seeds=list(range(lo, hi)), temperature=0.0)
    gathered = [None] * world
    dist.all_gather_object(gathered, [d.episode for d in dialogues])  # every rank gets every episode
    episodes = [e for part in gathered for e in part]
    failed, total, example = sim.parse_failure_stats(episodes)  # the gathered episodes: alike on every rank
    sim.check_parse_failures(failed, total, example, args.max_parse_failure_rate, f"evaluation at step {step}",
                             warn=(lambda line: print(f"rlver: {line}", flush=True)) if rank == 0 else None)
    if rank != 0:
        return None
    provenance = benchmark.provenance(args, profiles, args.test_profiles, list(range(len(profiles))), 0.0)
    return benchmark.report(episodes, os.path.join(args.out, "eval", f"step_{step}"), config={"provenance": provenance},
                            title=f"step {step} ({benchmark.setting_label(args)})")


# ----------------------------------------------------------------------------------------------------------
# Main


class StopFlag:
    """SIGINT/SIGTERM: finish the current step (or the checkpoint being written), save, exit 128 + the signal's
    number (train raises Stopped). A second signal stops at once, wherever it lands (interrupted)."""

    def __init__(self):
        self.signum = 0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.signum:
            interrupted(128 + signum)
        self.signum = signum
        print(f"rlver: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint (a second Ctrl-C "
              f"stops at once, without saving)", flush=True)


class Stopped(Exception):
    """A run stopped by a signal after saving its last step: main exits with `code` (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def interrupted(code):
    """Stop at once, nothing saved (a checkpoint being written stays a step_N.tmp, which --resume ignores); not
    sys.exit: no waiting on HTTP worker threads or a process group's teardown."""
    print("rlver: interrupted: stopped at once without saving; --resume continues from the last checkpoint",
          file=sys.stderr, flush=True)
    os._exit(code)


USER_ERRORS = (ConfigError, lm.CheckpointError, sim.ProfileError, sim.SimulatorError, benchmark.BenchmarkError)


def setup(args, argv):
    """Checks (cheap, one-line errors) and then the heavy part: models, optimizers. Returns the Run. Checks that
    read files or endpoints run on every rank and stop every rank together (a node may see other files)."""
    shape = resolve_model(args, argv)
    validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # flags only: alike on every rank
    _, _, device = setup_distributed()
    if args.activation_checkpointing is None:  # on by default on CUDA: 7B does not fit without it
        args.activation_checkpointing = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    from torch.distributed.fsdp import FSDPModule
    if not args.no_fsdp and not hasattr(FSDPModule, "set_reshard_after_forward"):
        raise ConfigError(f"torch {torch.__version__} lacks FSDPModule.set_reshard_after_forward, which the "
                          "rollout phase needs: install torch>=2.7, or run one process with --no-fsdp")
    profiles, test_profiles, backend = together(lambda: [
        sim.load_profiles(args.train_profiles) if args.train_profiles else sim.builtin_profiles("train"),
        sim.load_profiles(args.test_profiles) if args.test_profiles else sim.builtin_profiles("test"),
        make_simulator(args, device)], USER_ERRORS)
    args.resume_from = claim_out(args)  # the first write into --out
    make_random_model(args, shape)
    official = together(lambda: args.official_prompts and sim.load_official_prompts(  # the authors' prompts
        args.official_prompts, args.protocol, args.think, args.official_quirks, args.simulator), USER_ERRORS)
    profiles, test_profiles = ([replace(p, prompts=official) for p in ps] for ps in (profiles, test_profiles))
    cfg, tokenizer = together(lambda: validate_model(args, profiles), USER_ERRORS)
    prepare_out(args)
    return build_run(args, cfg, device, tokenizer, profiles, test_profiles, backend)


def claim_out(args):
    """
    One writer per --out, and every rank writing into the same folder. Rank 0 checks --out without writing
    anything (no other process holds its lock, check_out, check_resume), takes the lock (benchmark.lock_out) and
    checks again under it: of two runs started at once into one --out the second stops here, naming the first.
    Then every rank reads back the token rank 0 wrote into the lock file: a rank whose --out is another folder
    (another path, a node's local disk) stops every rank with one line, before any step. Returns the checkpoint
    to resume from (or None), alike on every rank.
    """
    rank, token = dist.get_rank(), os.urandom(8).hex()  # (rank 0's token is the one every rank looks for)

    def lock():
        if rank == 0:
            benchmark.check_not_locked(args.out)
            check_out(args)
            check_resume(args)
            benchmark.lock_out(args.out, token)
            check_out(args)
            path, damaged = check_resume(args)
            for line in damaged:
                print(f"rlver: warning: --resume: {line}; left in place, resuming from an older checkpoint",
                      flush=True)
            return path

    shared = [token, together(lock, USER_ERRORS)]
    dist.broadcast_object_list(shared, src=0)
    token, resume_from = shared

    def sees():
        try:
            with open(os.path.join(args.out, benchmark.LOCK_FILE), encoding="utf-8") as f:
                if token in f.read():
                    return
        except OSError:
            pass
        raise ConfigError(f"rank {rank} on {socket.gethostname()} does not see the run folder rank 0 writes (--out "
                          f"{args.out} lacks rank 0's {benchmark.LOCK_FILE}): give every node the same --out on a "
                          f"filesystem they share")

    together(sees, USER_ERRORS)
    return resume_from


def resolve_model(args, argv):
    """--model as a folder: the demo's tiny model with no --model, <out>/random-NAME for a model.SHAPES name
    (a real architecture with random weights: a smoke run at a real size). Returns the shape name or None."""
    if args.model is None:
        apply_demo_defaults(args, argv)
    if args.model in lm.SHAPES:
        shape, args.model = args.model, os.path.join(args.out, f"random-{args.model}")
        return shape
    return None


def make_random_model(args, shape):
    """The demo's tiny model, or a random-weight checkpoint of a real shape, made once by rank 0 (a shape is
    written next to its folder and renamed when complete: an interrupted write is never used)."""
    demo = args.model == os.path.join(args.out, "tiny-qwen2")
    if not (demo or shape):
        return
    if dist.get_rank() == 0 and not os.path.isdir(args.model):  # (only rank 0 looks: no rank skips the barrier)
        if demo:
            print(f"rlver: demo mode: making a tiny random model in {args.model}", flush=True)
            lm.make_tiny_checkpoint(args.model, "qwen2", seed=args.seed, hidden_size=64, num_layers=2)
        else:
            print(f"rlver: making a random-weight {shape} checkpoint in {args.model} (once)", flush=True)
            shutil.rmtree(args.model + ".tmp", ignore_errors=True)
            os.replace(lm.make_random_checkpoint(args.model + ".tmp", lm.SHAPES[shape], seed=args.seed), args.model)
    dist.barrier()


def make_simulator(args, device):
    """The simulated user's backend (simulator.make_backend), reachability checked."""
    client = {}  # the HTTP client's knobs, for an endpoint simulator
    if args.simulator.startswith(("http://", "https://")):
        client = dict(timeout=args.simulator_timeout, max_retries=args.simulator_retries)
    try:
        backend = sim.make_backend(args.simulator, model_name=args.simulator_model,
                                   api_key_env=args.simulator_key_env, device=device, **client)
    except (ValueError, lm.CheckpointError) as e:
        raise ConfigError(f"--simulator: {e}") from None
    backend.check()
    return backend


def prepare_out(args):
    """--out made ready: an earlier run's files removed under --overwrite (the resolved config is written by
    train once the checkpoint, if any, has loaded)."""
    rank = dist.get_rank()
    if args.resume and not args.resume_from and rank == 0:
        print(f"rlver: --resume: no checkpoint in {args.out}/checkpoints yet, starting at step 0", flush=True)
    if args.overwrite and rank == 0:  # asked for explicitly: the earlier run's files go
        for name in RUN_FILES:
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    dist.barrier()
    os.makedirs(args.out, exist_ok=True)


def build_run(args, cfg, device, tokenizer, profiles, test_profiles, backend):
    """The models and their optimizers: the policy; the frozen reference when --kl-coef > 0; PPO's critic."""
    torch.manual_seed(args.seed)

    def trainable(model, lr, ratio):  # linear warmup over ratio x --steps (or --warmup-steps), then constant
        n = args.warmup_steps or int(ratio * args.steps)
        warmup = lambda s: min(1.0, (s + 1) / n) if n else 1.0  # noqa: E731
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)

    policy, optimizer, scheduler = trainable(build_model(args, cfg, device, trainable=True), args.lr, args.warmup_ratio)
    run = Run(device=device, tokenizer=tokenizer, eos_ids=lm.stop_token_ids(tokenizer, args.model), profiles=profiles,
              test_profiles=test_profiles, backend=backend, policy=policy, optimizer=optimizer, scheduler=scheduler)
    if args.kl_coef > 0:
        run.reference = build_model(args, cfg, device, trainable=False)
    if args.algo == "ppo":
        run.critic, run.critic_optimizer, run.critic_scheduler = trainable(
            build_model(args, cfg, device, trainable=True, critic=True), args.critic_lr, args.critic_warmup_ratio)
    return run


def start_step(run, args, metrics_path):
    """0 for a fresh run (check_out made sure --out holds no earlier run); with --resume the step of the newest
    readable checkpoint (claim_out), and the metrics and samples of later steps dropped (they are redone)."""
    from torch.distributed.checkpoint.api import CheckpointException

    start, path = 0, args.resume_from
    if path:
        try:
            start = load_checkpoint(run, path)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (damaged past checkpoint_problem's look)
            e = rank_error(e)
            raise ConfigError(f"--resume: cannot load {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                              f"): move it out of {args.out}/checkpoints to resume from the one before") from None
    if args.resume and dist.get_rank() == 0:
        truncate_jsonl(metrics_path, start)
        truncate_jsonl(os.path.join(args.out, "samples.jsonl"), start)
        if path:
            print(f"rlver: resumed from {path} at step {start}", flush=True)
    return start


def resume_hint(argv):
    """The command that continues this run."""
    argv = list(argv if argv is not None else sys.argv[1:])
    argv += [] if "--resume" in argv else ["--resume"]
    if dist.get_world_size() > 1:
        return f"the same torchrun command with {' '.join(argv)}"
    return "python rlver.py " + " ".join(argv)


def save(run, args, step):
    """A checkpoint of `step`, and curves.svg of the metrics so far."""
    path = save_checkpoint(run, args, step)
    if dist.get_rank() == 0:
        benchmark.write_curves(os.path.join(args.out, "curves.svg"), benchmark.run_rows(args.out),
                               title=f"rlver {args.algo} ({benchmark.setting_label(args)})")
        print(f"rlver: saved {path}", flush=True)
    return path


def train(args, argv=None):
    run = setup(args, argv)
    rank = dist.get_rank()
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start = start_step(run, args, metrics_path)
    if rank == 0:  # after the checkpoint loaded: a --resume that fails leaves the run's config.json as it was
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({**vars(args), "world_size": dist.get_world_size(), "device": str(run.device),
                       "torch": torch.__version__}, f, indent=2)
        print(f"rlver: {args.algo} on {args.model} | {dist.get_world_size()} process(es) on {run.device} | "
              f"{len(run.profiles)} train profiles x {args.group_size} rollouts | simulator {args.simulator} "
              f"({args.mode}) | out {args.out}", flush=True)
    stop, stop_now = StopFlag(), 0
    signalled = lambda: int(all_reduce(float(stop.signum), dist.ReduceOp.MAX))  # noqa: E731 (the signal, any rank)
    done = saved = start  # the last step whose update and metrics are complete; the last checkpointed step
    warned = set()  # the COUNTS already warned about (cut replies, cut thoughts, wild changes)
    for step in range(start, args.steps):
        try:
            metrics, dialogues = train_step(run, args, step)
            metrics["step"] = step + 1
            if rank == 0:
                append_jsonl(metrics_path, [metrics])
                append_jsonl(os.path.join(args.out, "samples.jsonl"),
                             [sim.transcript(d.episode, step=step + 1, policy_texts=d.policy_texts)
                              for d in dialogues[:args.log_samples]])
                print(log_line(metrics, args.steps), flush=True)
                first = {k: metrics[k] for k in sim.COUNTS if metrics.get(k) and k not in warned}  # once a run
                warned.update(first)
                for line in sim.count_warnings(first, f"step {step + 1}"):
                    print(f"rlver: {line} (warned once; every step's count is in metrics.jsonl)", flush=True)
            done = step + 1
            if args.eval_every and (step + 1) % args.eval_every == 0:
                summary = evaluate_policy(run, args, step + 1)
                if rank == 0:
                    print(f"eval step {step + 1}: score {summary['score']:.1f} success {summary['success_rate']:.2f} "
                          f"failure {summary['failure_rate']:.2f}", flush=True)
        except sim.SimulatorError as e:
            # The step in progress is discarded: resume replays it exactly (seeds are per (seed, step, dialogue)).
            if done > saved:
                save(run, args, done)
            kept = f"step {done} is saved" if done else "no step was completed"
            raise ConfigError(f"{e}. Stopped: {kept}; after fixing the simulator, continue with: "
                              f"{resume_hint(argv)}") from None
        stop_now = signalled()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop_now:
            save(run, args, step + 1)
            saved = step + 1
            stop_now = signalled()  # one asked during the save: stop right after it
        if stop_now:
            break
    if stop_now and done < args.steps:  # not "done": a scheduler or an `&&` chain must see an unfinished run
        raise Stopped(f"stopped by {signal.Signals(stop_now).name} at step {done} of {args.steps} (saved); continue "
                      f"with: {resume_hint(argv)}", 128 + stop_now)
    if rank == 0:
        rewards = [json.loads(line)["reward"] for line in open(metrics_path)]
        k = max(1, min(5, len(rewards) // 2))
        print(f"rlver: done. mean reward over the first {k} steps {sum(rewards[:k]) / k:.3f}, over the last {k} "
              f"{sum(rewards[-k:]) / k:.3f}. Metrics: {metrics_path}; curves: {os.path.join(args.out, 'curves.svg')}; "
              f"transcripts: {os.path.join(args.out, 'samples.jsonl')}; model (HF layout): "
              f"{checkpoint_dirs(args.out)[-1]}/hf", flush=True)
    return done


def main(argv=None):
    args = get_args(argv)
    code = 0
    try:
        train(args, argv)
    except (*USER_ERRORS, Stopped) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: one line, not one per rank
            print(f"rlver: {'error: ' if not isinstance(e, Stopped) else ''}{e}", file=sys.stderr, flush=True)
        code = e.code if isinstance(e, Stopped) else 2
    except KeyboardInterrupt:  # Ctrl-C before StopFlag is installed (setup): stop now
        interrupted(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Every file is written and closed. A thread may still hang on a dead simulator, and the interpreter's
    # teardown with it and torch's threads can abort the process ("terminate called without an active
    # exception", exit -6: seen after errors and, once in a full suite, after a finished torchrun run), so
    # every run, finished or not, leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
