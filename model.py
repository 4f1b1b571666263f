"""The policy LM in plain PyTorch: a Llama-family decoder (Llama 3, Qwen2/2.5, Qwen3) that loads a local Hugging
Face checkpoint, scores tokens (teacher-forced log-probs), generates with a preallocated KV cache and saves back in
the HF layout. Top to bottom: config, blocks and the Transformer, log-probs, KV cache / sampling / generate,
checkpoints, random weights. Names as in HF (model.layers.0.self_attn.q_proj.weight): a plain state_dict."""

import contextlib
import functools
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class CheckpointError(ValueError):
    """A problem with a model folder that the user can fix (bad path, missing file, unsupported model)."""


# ----------------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v (not o)
    o_bias: bool = False  # Llama/Qwen3 `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    hf: dict = field(default_factory=dict)  # the original config.json, written back unchanged on save

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise CheckpointError(f"unsupported model_type {model_type!r}: rlver implements {', '.join(ARCHITECTURES)}"
                                  " (Qwen2/2.5, Llama 3.x, Qwen3); convert the model or pick one of those")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) is implemented")
        if hf.get("use_sliding_window", False):
            raise CheckpointError("sliding-window attention is not implemented: set use_sliding_window=false")
        # RoPE: transformers < 5 writes rope_theta + rope_scaling, transformers >= 5 rope_parameters
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10_000.0))
        rope_scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
        if rope_scaling is not None and rope_type not in ("default", "linear", "llama3"):
            raise CheckpointError(f"unsupported rope scaling {rope_type!r}: rlver implements default, linear, llama3")
        n_heads, attention_bias = hf["num_attention_heads"], hf.get("attention_bias", False)
        sizes = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
        return cls(model_type=model_type, **sizes, num_attention_heads=n_heads, rope_scaling=rope_scaling,
                   num_key_value_heads=hf.get("num_key_value_heads") or n_heads, rope_theta=float(rope_theta),
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, mlp_bias=hf.get("mlp_bias", False),
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False),
                   qkv_bias=model_type == "qwen2" or attention_bias, o_bias=model_type != "qwen2" and attention_bias,
                   qk_norm=model_type == "qwen3", hf=hf)


# The published configs (HF hub config.json of Qwen2.5 Instruct, Llama-3.1-8B-Instruct, Qwen3-8B, keys we ignore left
# out) for random weights at real sizes; their published sizes (checked by tests): 494M, 1.54B, 7.62B, 8.03B, 8.19B.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
QWEN25 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=2, hidden_act="silu",
              rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768, use_sliding_window=False,
              bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")  # what the Qwen2.5 sizes share
SHAPES = {
    "qwen2.5-0.5b": dict(QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(QWEN25, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, tie_word_embeddings=True),
    "qwen2.5-7b": dict(QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=LLAMA31_ROPE,
                      max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16"),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                     max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643,
                     eos_token_id=151645, torch_dtype="bfloat16"),
}


# ----------------------------------------------------------------------------------------------------------
# Building blocks and the model

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # one fused op; the weight cast to x's dtype (bf16 x under autocast) so it stays fused and returns x's dtype
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary embedding frequencies theta_i = base^(-2i/D), i < D/2 (Su et al. 2021), with optional scaling. (D/2,)"""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":  # position interpolation: positions / factor
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, the band between interpolated smoothly
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_context / lo, inv_freq / factor, inv_freq)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / hi) & (wavelen <= old_context / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, positions, dtype):
    """cos/sin tables for integer positions (B, T) -> two (B, 1, T, D), in the HF 'rotate half' layout."""
    angles = positions[:, :, None].float() * inv_freq[None, None, :]  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+D/2}) pair by its angle. x: (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): H query heads share H_kv key/value heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values, attend over the slots the mask covers (its last dim)
            k, v = cache.update(self.layer_idx, k, v, mask.shape[-1])  # (B, H_kv, S_used, D)
        if mask is None:  # right-padded training data: plain causal attention is exact for every real token (flash)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # prefill and decode: a mask over the cache
            y = grouped_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def grouped_attention(q, k, v, mask):
    """Masked GQA, each query group folded into the sequence axis (a mask with enable_gqa=True leaves CUDA only the
    math kernel): q (B, H_kv * G, T, D) as (B, H_kv, G * T, D), mask (B, 1, T, S), k, v (B, H_kv, S, D) -> q's shape."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], G * T, D), k, v, attn_mask=mask.repeat(1, 1, G, 1))
    return y.reshape(B, H, T, D)  # row g * T + t of kv head j is query head j * G + g at position t


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)), the MLP SwiGLU (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.mlp = nn.ModuleDict(dict(gate_proj=nn.Linear(hidden, inner, bias=cfg.mlp_bias),
                                      up_proj=nn.Linear(hidden, inner, bias=cfg.mlp_bias),
                                      down_proj=nn.Linear(inner, hidden, bias=cfg.mlp_bias)))

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h, mlp = self.post_attention_layernorm(x), self.mlp
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))  # down(silu(gate(h)) * up(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # `model.*` and `lm_head` mirror the HF module tree so state_dict keys match the checkpoint files.
        self.model = nn.ModuleDict(dict(embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                                        layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
                                        norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # small Qwen models share the input embedding with the output head
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.autocast_dtype = None  # bf16 compute over fp32 weights: forward() under torch.autocast (FSDP2: its policy)

    def reset_rope(self, device):
        """Recompute the (non-checkpoint) RoPE buffer, e.g. after the model was built on the meta device."""
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def forward(self, ids, targets=None, temperature=1.0, positions=None, mask=None, cache=None, return_hidden=False,
                with_entropy=True):
        """ids (B, T) -> logits (B, T, V); return_hidden: final-norm hidden states (B, T, C); targets (B, T): (log p,
        entropy) (chunked_logprobs); a cache: the last logits (B, V). positions (B, T): RoPE positions (0..T-1).
        mask (B, 1, T, S) bool, True = may attend; None = causal over a right-padded batch (via forward: FSDP2)."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        with compute_region(self):
            x = self.model.embed_tokens(ids)  # (B, T, C)
            cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, 1, T, D)
            for block in self.model.layers:
                if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:  # training forwards
                    x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
                else:
                    x = block(x, cos, sin, mask, cache)
            x = self.model.norm(x)
            if return_hidden:
                return x
            if targets is not None:
                return chunked_logprobs(self.lm_head, x, targets, temperature, with_entropy=with_entropy)
            return self.lm_head(x[:, -1] if cache is not None else x)  # (B, V) or (B, T, V)


def _chunk_logprobs(lm_head, hidden, targets, temperature, with_entropy=True):
    logits = lm_head(hidden).float() / temperature  # (B, t, V) fp32, one chunk only
    logz = torch.logsumexp(logits, dim=-1)  # (B, t)
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - logz
    if not with_entropy:  # (a scoring pass: the entropy is only logged from the update's own forward)
        return logprobs, torch.zeros(0, device=logits.device)
    return logprobs, logz - (logits.softmax(-1) * logits).sum(-1)  # entropy H = log Z - E_p[logit]


def chunked_logprobs(lm_head, hidden, targets, temperature=1.0, chunk_size=512, with_entropy=True):
    """log p(target_t) under softmax(logits_t / temperature) and its entropy, hidden (B, T, C), targets (B, T) -> two
    (B, T) fp32 (entropy None unless with_entropy); T in chunks, checkpointed: no (B, T, V) fp32 logits are held."""
    chunk = (functools.partial(torch.utils.checkpoint.checkpoint, _chunk_logprobs, use_reentrant=False)
             if torch.is_grad_enabled() else _chunk_logprobs)
    parts = [chunk(lm_head, hidden[:, s:s + chunk_size], targets[:, s:s + chunk_size], temperature, with_entropy)
             for s in range(0, hidden.shape[1], chunk_size)]
    return torch.cat([lp for lp, _ in parts], 1), torch.cat([e for _, e in parts], 1) if with_entropy else None


def token_logprobs(model, ids, temperature=1.0, return_entropy=False):
    """Teacher-forced log-probs (B, T-1) of right-padded ids (B, T) at the sampling temperature: logits at [:, :-1]
    score ids[:, 1:], entry t is log p(ids[:, t+1] | ids[:, :t+1])."""
    logprobs, entropy = model(ids[:, :-1], targets=ids[:, 1:], temperature=temperature, with_entropy=return_entropy)
    return (logprobs, entropy) if return_entropy else logprobs


# ----------------------------------------------------------------------------------------------------------
# KV cache, prefill and decode, sampling, generate (rollout.Engine drives the same steps per dialogue)

class KVCache:
    """Preallocated keys/values of `model`, one (N, H_kv, S + 1, D) pair per layer in its compute dtype: each sequence
    owns a row ("slot") holding its first `length` ids at positions 0.. (= RoPE positions), the last column a trash
    slot for padding. Before each forward, forward_slots sets `rows` (a slice lo:hi, a view; or a (b,) tensor,
    gathered) and `positions` (b, T) where the new tokens go."""

    def __init__(self, model, n_slots, max_len):
        cfg, device = model.config, model.inv_freq.device
        dtype = model.autocast_dtype or model.model.embed_tokens.weight.dtype  # the compute dtype
        shape = (n_slots, cfg.num_key_value_heads, max_len + 1, cfg.head_dim)  # + 1: the trash column
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        for t in self.k + self.v:  # inputs the compiled decode step mutates: static, or CUDA graphs are skipped
            torch._dynamo.mark_static_address(t, guard=False)  # (no guard: a new rollout's cache compiles nothing)
        self.trash, self.rows, self.positions = max_len, None, None

    def update(self, layer, k, v, used):
        """Write k, v (b, H_kv, T, D) at (rows, positions); return the rows' first `used` slots (b, H_kv, used, D)."""
        kc, vc, rows = self.k[layer], self.v[layer], self.rows
        if isinstance(rows, slice):  # a span lo:hi: a view of its rows (no copy), numbered 0..b-1
            kc, vc, rows = kc[rows], vc[rows], slice(None)
        index = torch.arange(k.shape[0], device=k.device) if isinstance(rows, slice) else rows  # (b,)
        # advanced indices first: (b, T, H_kv, D); in the cache's dtype (under autocast k may leave RoPE in fp32)
        kc[index[:, None], :, self.positions] = k.transpose(1, 2).to(kc.dtype)
        vc[index[:, None], :, self.positions] = v.transpose(1, 2).to(vc.dtype)
        return kc[rows, :, :used], vc[rows, :, :used]  # the span's view, or the gathered rows


def forward_slots(model, cache, rows, tokens, positions, used):
    """One forward of some slots: tokens, positions (b, T); rows a slice or (b,) tensor; used: cache columns
    attended. A query at position p sees its own row's keys at positions <= p. Returns logits (b, V)."""
    mask = (torch.arange(used, device=tokens.device) <= positions[:, :, None])[:, None]  # (b, 1, T, used)
    cache.rows, cache.positions = rows, positions
    return model(tokens, positions=positions, mask=mask, cache=cache)


def prefill(model, cache, slots, new_ids, starts, pad_id):
    """Feed each slot its new ids (ragged) in one forward, left-padded so every row's last real token is the
    last column; row i's ids go to positions starts[i]..., padding to the trash column. Returns logits (b, V)."""
    T, device = max(map(len, new_ids)), cache.k[0].device
    tokens = torch.tensor([[pad_id] * (T - len(x)) + list(x) for x in new_ids], device=device)  # (b, T)
    positions = torch.tensor([[cache.trash] * (T - len(x)) + list(range(s, s + len(x)))
                              for x, s in zip(new_ids, starts)], device=device)  # (b, T)
    used = max(s + len(x) for x, s in zip(new_ids, starts))
    return forward_slots(model, cache, torch.tensor(slots, device=device), tokens, positions, used)


def attended_columns(needed, total):
    """The compiled decode step's attended columns: the smallest of total / 8, / 4, / 2, total (the cache's columns)
    that holds `needed`, so a short context does not pay for the whole cache and each length compiles once."""
    return next(n for n in (total >> 3, total >> 2, total >> 1, total) if n >= needed)


def decode_one_token(model, cache, slots, tokens, lengths, pad_id, compiled=None):
    """One token for each generating slot, written at lengths[slot], over the span of slots lo:hi (a view, no copy;
    idle slots in it write a pad to the trash column). compiled (compiled_decode's step): static shapes, one per
    (slot count, attended_columns), the span every slot. Returns the slots' logits (b, V)."""
    device = tokens.device
    lo, hi = (0, cache.k[0].shape[0]) if compiled is not None else (min(slots), max(slots) + 1)
    # (b,) rows of the span and write positions, in one host-to-device copy
    index, positions = torch.tensor([[i - lo for i in slots], [lengths[i] for i in slots]], device=device)
    span_tokens = torch.full((hi - lo, 1), pad_id, dtype=torch.long, device=device)  # (hi - lo, 1)
    span_tokens.index_copy_(0, index, tokens[:, None])
    span_positions = torch.full((hi - lo, 1), cache.trash, dtype=torch.long, device=device)  # idle rows: trash
    span_positions.index_copy_(0, index, positions[:, None])
    used = max(lengths[i] for i in slots) + 1
    used = attended_columns(used, cache.trash + 1) if compiled is not None else used
    return forward_slots(compiled or model, cache, slice(lo, hi), span_tokens, span_positions, used)[index]


def keyed_uniform(keys):
    """One U(0, 1) draw per row (B,) float64, a pure function of the row's key (B, 2) int64 = (seed, draw index):
    a counter-based stream per row (as Philox is), the whole batch drawn in a few elementwise kernels."""

    def mul32(x, c):  # (x * c) mod 2^32 for int64 x < 2^32, in two 16-bit halves of c: no product passes 2^63
        return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF

    def fmix32(h):  # MurmurHash3's 32-bit finaliser (Appleby 2011): a bijection of [0, 2^32) mixing every bit
        for shift, c in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
            h = mul32(h ^ (h >> shift), c)
        return h ^ (h >> 16)

    lo, hi, draw = keys[:, 0] & 0xFFFFFFFF, (keys[:, 0] >> 32) & 0xFFFFFFFF, keys[:, 1] & 0xFFFFFFFF
    h = fmix32(fmix32(fmix32(lo) ^ hi) ^ draw)
    return (h.double() + 0.5) / 2**32  # in (0, 1)


def sample(logits, temperature, top_p, generator):
    """The next token from logits (B, V): greedy at temperature 0, else softmax(logits / temperature) cut to the
    smallest set whose probability reaches top_p (nucleus, Holtzman et al. 2020) -> tokens (B,) and their log-probs
    (what the trainer recomputes). generator: a torch.Generator, B of them (a stream per row) or (B, 2) keys."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits / (temperature or 1.0), dim=-1)  # (B, V) (greedy: of the plain softmax)
    probs = logprobs.exp()
    if top_p < 1.0 and temperature:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep tokens until the mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if temperature == 0:
        tokens = logits.argmax(-1)
    elif isinstance(generator, torch.Tensor):  # inverse CDF: the first token whose cumulative mass passes u * total
        cdf = probs.cumsum(-1)  # (B, V) (its last column is the mass top-p kept)
        u = (keyed_uniform(generator) * cdf[:, -1].double()).float()  # (B,)
        tokens = torch.searchsorted(cdf, u[:, None], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    else:  # argmax(p / E), E = -log(U) ~ Exp(1), draws from p (the exponential race, as Gumbel-max), no host sync
        if isinstance(generator, (list, tuple)):  # a row's sample does not depend on the other rows of its batch
            uniform = torch.stack([torch.rand(probs.shape[-1], device=probs.device, generator=g) for g in generator])
        else:
            uniform = torch.rand(probs.shape, device=probs.device, generator=generator)
        tokens = (probs / -uniform.log()).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


SYNC_EVERY = 8  # generate() checks whether every row is done (a host sync) once per this many tokens
_TWINS = weakref.WeakKeyDictionary()  # model -> (its plain twin, the twin torch.compile'd), for the decode step


@contextlib.contextmanager
def compiled_decode(model, enabled=True):
    """The torch.compile'd decode step of `model` for one generation (None unless enabled): a plain Transformer twin,
    compiled once, sharing the model's weights in its compute dtype until the generation ends, so no FSDP2 hook or
    autocast cast enters the graph. On CUDA, "reduce-overhead" captures each shape in a CUDA graph."""
    if not enabled:
        yield None
        return
    if model not in _TWINS:
        with torch.device("meta"):
            twin = Transformer(model.config)
        mode = "reduce-overhead" if model.inv_freq.device.type == "cuda" else None
        _TWINS[model] = twin, torch.compile(twin, mode=mode, dynamic=False)
    twin, step = _TWINS[model]
    dtype = model.autocast_dtype or model.model.embed_tokens.weight.dtype  # the compute dtype
    shared = {}  # one twin tensor per source tensor (tied weights)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in shared:
            shared[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        module, _, key = name.rpartition(".")
        twin.get_submodule(module)._parameters[key] = shared[id(p)]
    twin.inv_freq = model.inv_freq

    def decode(*args, **kwargs):
        with torch.autocast(model.inv_freq.device.type, enabled=False):
            return step(*args, **kwargs)

    try:
        yield decode
    finally:  # the twin keeps no weight between generations (a bf16 copy would sit in memory through training)
        for module in twin.modules():
            module._parameters.update(dict.fromkeys(module._parameters))  # every entry None


def compute_region(model):
    """torch.autocast to autocast_dtype if set, else a no-op; around a whole generation it casts each weight once."""
    dtype = getattr(model, "autocast_dtype", None)
    return torch.autocast(model.inv_freq.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_ids, temperature=1.0, top_p=1.0, generator=None, pad_id=0,
             compile=False):
    """Per prompt (B token-id lists) the sampled ids through the first EOS (or max_new_tokens) and their log-probs
    (sample()): every prompt prefilled into its slot, then one token per row and step, every row in the step (so,
    unlike decode_one_token, its write positions stay on the device: no host copy, no sync per token). compile: the
    decode step through torch.compile."""
    device, rows, P = model.inv_freq.device, list(range(len(prompts))), max(map(len, prompts))
    cache = KVCache(model, len(prompts), P + max_new_tokens)
    lengths = torch.tensor([len(p) for p in prompts], device=device)[:, None]  # (B, 1): token t goes to lengths + t
    eos = torch.tensor(list(eos_ids), device=device)
    out_ids = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(len(prompts), max_new_tokens, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    with compute_region(model), compiled_decode(model, enabled=compile) as compiled:
        logits = prefill(model, cache, rows, prompts, [0] * len(prompts), pad_id)  # (B, V)
        for t in range(max_new_tokens):
            tokens, logprobs = sample(logits, temperature, top_p, generator)
            tokens = tokens.masked_fill(done, pad_id)  # finished rows keep emitting padding
            out_ids[:, t], out_logprobs[:, t] = tokens, logprobs
            done = done | torch.isin(tokens, eos)
            if t == max_new_tokens - 1 or (t % SYNC_EVERY == SYNC_EVERY - 1 and bool(done.all())):
                break
            used = P + t + 1 if compiled is None else attended_columns(P + t + 1, cache.trash + 1)
            logits = forward_slots(compiled or model, cache, slice(0, len(prompts)), tokens[:, None], lengths + t, used)
    out_ids, out_logprobs, eos = out_ids.tolist(), out_logprobs.tolist(), set(eos_ids)
    ends = [next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row)) for row in out_ids]  # through EOS
    return [r[:n] for r, n in zip(out_ids, ends)], [r[:n] for r, n in zip(out_logprobs, ends)]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints in the Hugging Face layout

def read_config(path) -> ModelConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"model path {path!r} is not a directory: pass a local HF checkpoint folder")
    try:
        return ModelConfig.from_hf(json.loads(Path(config_file).read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{config_file} not found: a HF checkpoint folder needs config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    except KeyError as e:
        raise CheckpointError(f"{config_file} lacks the key {e.args[0]!r}") from None


def check_weights(path) -> list:
    """The checkpoint's *.safetensors files (the index's list if sharded), each checked from its header alone: 8 bytes
    little-endian length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then exactly the bytes promised."""
    index = Path(path, "model.safetensors.index.json")
    names = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else sorted(n for n in os.listdir(path) if n.endswith(".safetensors")))
    if not names:
        raise CheckpointError(f"no *.safetensors weights in {path} (.bin checkpoints are not supported: "
                              "re-save with safe_serialization=True)")
    files = [os.path.join(path, n) for n in names]
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"weight shard {f} listed in the index is missing")
        size = os.path.getsize(f)
        fix = f"re-download or re-save the checkpoint ({f} is {size} bytes)"
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")  # a file under 8 bytes fails 8 + n > size
            if n < 2 or 8 + n > size:
                raise CheckpointError(f"{f} is truncated or not a safetensors file: {fix}")
            try:
                header = json.loads(fh.read(n).decode("utf-8"))
                end = max([0] + [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"])
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                raise CheckpointError(f"{f} has a corrupt safetensors header: {fix}") from None
        if 8 + n + end != size:
            raise CheckpointError(f"{f} is truncated or corrupt: its header promises {8 + n + end} bytes; {fix}")
    return files


def load_state_dict(path, dtype=None, device="cpu") -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    state = {}
    for f in check_weights(path):
        try:
            tensors = load_file(f, device=str(device))
        except SafetensorError as e:
            raise CheckpointError(f"{f} cannot be read ({e}): re-download or re-save the checkpoint") from None
        state.update({k: t.to(dtype) if dtype is not None and t.is_floating_point() else t for k, t in tensors.items()})
    return state


def load_model(path, device="cpu", dtype=torch.float32) -> Transformer:
    """Build the model on the meta device (no memory), then adopt the checkpoint's tensors as parameters."""
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()   # tied checkpoints store only the embedding
    state = {k: v for k, v in load_state_dict(path, dtype, device).items() if k not in tied}
    expected = set(model.state_dict()) - tied
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not match config.json: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    return _retie(model, device)


def _retie(model, device):
    """After a meta-device build: the head tied again (assign=True and to_empty untie it), RoPE on `device`."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(device)
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise CheckpointError(f"tokenizer path {path!r} is not a directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise CheckpointError(f"the tokenizer in {path} has no chat template: use an instruct/chat model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(tokenizer, model_path=None):
    """The ids that end an assistant turn: the tokenizer's EOS plus the eos_token_id of config.json and
    generation_config.json in model_path (default: the tokenizer's folder), e.g. Llama 3's <|eot_id|>."""
    ids, model_path = {tokenizer.eos_token_id}, model_path or getattr(tokenizer, "name_or_path", None) or ""
    for path in (os.path.join(model_path, "config.json"), os.path.join(model_path, "generation_config.json")):
        if model_path and os.path.isfile(path):
            eos = json.loads(Path(path).read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def save_model(state_dict: dict, cfg: ModelConfig, path, tokenizer=None, max_shard_bytes=5 * 2**30):
    """Write config.json + safetensors (sharded with an index past max_shard_bytes), loadable by transformers, floats
    in the dtype config.json declares (torch_dtype or dtype; else fp32): a bf16 model's fp32 master weights in bf16."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    dtype = getattr(torch, str(cfg.hf.get("torch_dtype") or cfg.hf.get("dtype")), None)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32  # none declared: fp32 loses nothing
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()  # a tied head: not stored
             for k, v in state_dict.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    shards = [{}]   # tensors in order, a new shard where the next would pass max_shard_bytes
    for name, tensor in state.items():
        if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = tensor
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    names = names if len(shards) > 1 else ["model.safetensors"]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                       "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}, f, indent=2)
    Path(path, "config.json").write_text(json.dumps(cfg.hf, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------
# Random weights: a tiny checkpoint (tests, the CPU demo) with a tokenizer trained on the spot; real sizes (SHAPES)

CHATML_TEMPLATE = ("{% for message in messages %}"
                   "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added tokens that stay visible in decoded text, as in Qwen3


def train_tokenizer(vocab_size=1024):
    """A byte-level BPE tokenizer (the scheme Qwen and Llama 3 use) trained on every file under prompts/."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, AddedToken
    from transformers import PreTrainedTokenizerFast
    texts = ["I hear you. That sounds really hard, and it makes sense that you feel this way. "
             "What happened next? How are you feeling right now? You are not alone."]
    for path in sorted((Path(__file__).resolve().parent / "prompts").iterdir()):
        texts.extend(line for line in path.read_text(encoding="utf-8", errors="ignore").splitlines() if line.strip())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE, model_max_length=32768)


def tiny_hf_config(model_type, vocab_size, eos_token_id=None, hidden_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_size=128):
    llama = model_type == "llama"
    return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": vocab_size,
            "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": hidden_size // num_heads,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 500_000.0 if llama else 1_000_000.0,
            "rope_scaling": dict(LLAMA31_ROPE) if llama else None, "max_position_embeddings": 32768,
            "tie_word_embeddings": not llama, "attention_bias": False, "use_sliding_window": False,
            "torch_dtype": "float32", "eos_token_id": eos_token_id, "bos_token_id": None, "pad_token_id": None}


@torch.no_grad()
def randomize_(model: Transformer) -> Transformer:
    """Every parameter refilled from the default random stream: weights ~ N(0, 0.05^2) (a tiny model's next token
    is then not uniform), norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2) (tests notice an ignored one)."""
    for name, p in model.named_parameters():
        std, mean = (0.1, 1.0) if name.endswith("norm.weight") else (0.1, 0.0) if name.endswith("bias") else (0.05, 0.0)
        p.normal_().mul_(std).add_(mean)
    return model


def random_model(hf: dict, device="cpu", dtype=torch.float32, seed=0) -> Transformer:
    """A model of any HF config (e.g. SHAPES[name]) with random weights, made straight on `device` in `dtype` from
    the meta device: one copy of the weights ever exists (Llama-3.1-8B in bf16: 16 GB, no fp32 or CPU detour)."""
    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    _retie(model.to_empty(device=device), device)
    torch.manual_seed(seed)
    return randomize_(model)


def make_tiny_checkpoint(path, model_type="qwen2", seed=0, vocab_size=1024, **config_kwargs):
    """Write a tiny random checkpoint in the exact HF layout of a real one (what tests and the CPU demo use)."""
    tokenizer = train_tokenizer(vocab_size)
    cfg = ModelConfig.from_hf(tiny_hf_config(model_type, len(tokenizer), tokenizer.eos_token_id, **config_kwargs))
    torch.manual_seed(seed)   # the CPU default init draws from it before randomize_: the weights the tests are tuned on
    save_model(randomize_(Transformer(cfg)).state_dict(), cfg, path, tokenizer)
    return path


def make_random_checkpoint(path, hf: dict, seed=0, dtype=torch.bfloat16):
    """A random checkpoint of a real architecture (hf: e.g. SHAPES[name]) with the tiny tokenizer and its special ids,
    so `rlver.py --model NAME` runs at a real size without a download (ids it lacks decode to nothing)."""
    tokenizer = train_tokenizer()
    hf = dict(hf, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
              torch_dtype=str(dtype).removeprefix("torch."))
    save_model(random_model(hf, "cpu", dtype, seed).state_dict(), ModelConfig.from_hf(hf), path, tokenizer)
    return path
