"""PPO for RLVER: critic, per-token rewards, GAE over policy tokens, clipped policy and value losses.

Per-token tensors are (B, T-1), aligned with the targets ids[:, 1:]: column t is about ids[:, t+1], predicted
from ids[:, :t+1]. `mask` (B, T-1) marks the tokens the policy sampled (its <think> and replies); system, user,
template and padding tokens are 0. Log-probs come from the caller at the SAMPLING temperature
(model.token_logprobs(model, ids, temperature)), so pi/pi_old compares the distribution that drew the samples.
"""
import copy

import torch
import torch.nn as nn

LOG_RATIO_CLAMP = 20.0  # clamp log(pi/pi_old) to +-20 before exp: exp(20) ~ 5e8 stays finite in fp32


# ----------------------------------------------------------------------------------------------------
# 1. Critic

def init_value_head(head: nn.Linear) -> nn.Linear:
    """weight ~ Normal(0, std=1/(D+1)), bias 0 (OpenRLHF's choice): initial values ~N(0, 1/D), near 0 for
    rewards in [0, 1]; not w = 0, which would give the backbone no gradient on the first update."""
    nn.init.normal_(head.weight, mean=0.0, std=1.0 / (head.in_features + 1))
    nn.init.zeros_(head.bias)
    return head


class Critic(nn.Module):
    """V(s_t): a deep copy of the policy (RLVER initialises the critic from the actor) with a scalar value head.
    It reads only final-norm hidden states, so it has no output head (an untied one: 545M dead weights at 7B).
    Build it BEFORE sharding the policy (an FSDP-wrapped module cannot be deep-copied); shard both afterwards."""

    def __init__(self, policy_model: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(policy_model)
        self.backbone.lm_head = None  # the critic reads hidden states only
        self.backbone.requires_grad_(True)
        hidden_size, device = policy_model.config.hidden_size, next(policy_model.parameters()).device
        # the head stays fp32 even for a bf16 backbone: values are small regression targets
        self.value_head = init_value_head(nn.Linear(hidden_size, 1, device=device, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # the value of target t (ids[:, t+1]) reads the hidden state at t, as the log-probs do
        hidden = self.backbone(ids[:, :-1], return_hidden=True).to(self.value_head.weight.dtype)  # (B, T-1, D)
        return self.value_head(hidden).squeeze(-1)  # (B, T-1)


# ----------------------------------------------------------------------------------------------------
# 2. Rewards per token

@torch.no_grad()
def token_rewards(final_rewards, mask, logprobs=None, ref_logprobs=None, kl_coef=0.0):
    """Per-token rewards (B, T-1): final_rewards (B,) (final emotion / 100) on each row's last policy token (a row
    without one gets none), minus the KL penalty in the reward (Ouyang et al. 2022, eq. 2) on every policy token:
    r_t -= kl_coef * k1_t, k1_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)."""
    mask = mask.bool()  # (B, T-1)
    rewards = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)  # (B, T-1)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T-1,)
    last = torch.where(mask, positions, -1).max(dim=1).values  # (B,) last policy position, -1 if none
    rows = (last >= 0).nonzero().squeeze(1)  # the rows with a policy token
    rewards[rows, last[rows]] = final_rewards.float().to(mask.device)[rows]
    if kl_coef:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs logprobs and ref_logprobs; pass both or set kl_coef=0")
        rewards = rewards - kl_coef * (logprobs.float() - ref_logprobs.float()) * mask  # k1_t, (B, T-1)
    return rewards


# ----------------------------------------------------------------------------------------------------
# 3. GAE over policy tokens only

@torch.no_grad()
def compute_gae(token_rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 11-16) over the policy's tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t                   (TD residual, eq. 12)
        A_t     = delta_t + gamma * lam * A_{t+1}               (eq. 16, as a reverse recursion)
        returns = A_t + V_t                                     (the critic's regression target)
    "t+1" is the NEXT POLICY token: the user's turn between two replies is no action of the agent, so a masked
    position carries V and A through unchanged (its reward is ignored); after the last policy token V = A = 0.
    Returns (advantages, returns), (B, T-1), 0 / V at masked positions."""
    mask = mask.bool()  # (B, T-1)
    rewards, values = token_rewards.float(), values.float()  # (B, T-1)
    next_value = rewards.new_zeros(rewards.shape[0])  # (B,) V of the next policy token (0 after the end)
    running = torch.zeros_like(next_value)  # (B,) A of the next policy token
    advantages = torch.zeros_like(rewards)  # (B, T-1)
    for t in reversed(range(rewards.shape[1])):  # vectorised over the batch
        valid = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * running  # (B,)
        running = torch.where(valid, advantage, running)  # masked: carry A_{t+1} through
        next_value = torch.where(valid, values[:, t], next_value)  # masked: carry V_{t+1} through
        advantages[:, t] = torch.where(valid, advantage, 0.0)
    return advantages, advantages + values  # (B, T-1) each


# ----------------------------------------------------------------------------------------------------
# 4. Statistics and loss reductions over valid tokens

def masked_mean(x, mask, dim=None, reduce=None):
    """Mean of x where mask is 1 (all dims, or along `dim`); 0 where nothing is valid. reduce: sums a tensor
    over processes (rlver.sum_over_ranks), for the mean over the global batch."""
    mask, reduce = mask.to(x.dtype), reduce or (lambda t: t)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    return reduce(total) / reduce(mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_var(x, mask, unbiased=True, reduce=None):
    """Variance of x over valid positions (Bessel-corrected by default; 0 for fewer than 2 values)."""
    mask, reduce = mask.to(x.dtype), reduce or (lambda t: t)
    squares = reduce((((x - masked_mean(x, mask, reduce=reduce)) * mask) ** 2).sum())
    count = reduce(mask.sum())
    return squares / (count - 1 if unbiased else count).clamp(min=1)


def masked_whiten(x, mask, eps=1e-8, reduce=None):
    """(x - mean) / std over the valid positions only (padding and user tokens would pull the mean to 0 and
    shrink the std); masked positions come out 0. reduce (see masked_mean): statistics over every rank."""
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# Loss aggregation. "token-mean" = sum of per-token losses of the step / N, N = valid tokens of the GLOBAL batch
# (all micro-batches, all ranks); "seq-mean-token-mean" (the original GRPO, Shao et al. 2024, eq. 3) = sum of
# per-sequence token means / S, S = non-empty sequences of the global batch. With W ranks the caller passes
# loss_scale_tokens = N / W (loss_scale_seqs = S / W) and calls backward() on each micro-batch loss undivided;
# FSDP's mean over ranks then gives d/dtheta [sum of all per-token losses / N]. None: the local counts.


def aggregate(loss_per_token, mask, agg="token-mean", loss_scale_tokens=None, loss_scale_seqs=None):
    """A (B, T-1) per-token loss reduced to a scalar over valid tokens (see the note above)."""
    mask = mask.to(loss_per_token.dtype)  # (B, T-1)
    if agg == "token-mean":
        n = mask.sum().clamp(min=1) if loss_scale_tokens is None else loss_scale_tokens
        return (loss_per_token * mask).sum() / n
    if agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(dim=1)  # (B,)
        seq_means = (loss_per_token * mask).sum(dim=1) / tokens_per_seq.clamp(min=1)  # (B,)
        s = (tokens_per_seq > 0).sum().clamp(min=1) if loss_scale_seqs is None else loss_scale_seqs
        return seq_means.sum() / s
    raise ValueError(f"unknown loss aggregation {agg!r}; use 'token-mean' or 'seq-mean-token-mean'")


# ----------------------------------------------------------------------------------------------------
# 5. PPO-clip policy loss

def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=None,
                agg="token-mean", loss_scale_tokens=None, loss_scale_seqs=None):
    """PPO-clip (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio_t = pi(a_t|s_t) / pi_old(a_t|s_t) = exp(logp - old_logp)
        L_t     = max(-A_t * ratio_t,  -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))

    Clip-higher (DAPO, Yu et al. 2025): clip_high > clip_low lets unlikely tokens with A > 0 grow more.
    Dual-clip (Ye et al. 2020, eq. 5) bounds the loss of A < 0, unbounded in the ratio: L_t = min(L_t, c * |A_t|),
    c = dual_clip > 1. Where a bound is active the token gets no gradient. Only logprobs (B, T-1) carries one.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3), got {dual_clip}")
    mask = mask.bool()  # (B, T-1)
    advantages = advantages.detach().float()  # (B, T-1)
    log_ratio = (logprobs.float() - old_logprobs.detach().float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # (B, T-1)
    loss_unclipped = -advantages * ratio  # (B, T-1)
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T-1)
    loss_per_token = torch.maximum(loss_unclipped, loss_clipped)  # (B, T-1) pessimistic bound, eq. 7
    clipped = loss_clipped > loss_unclipped  # (B, T-1) the clipped branch is active: no gradient
    dual_clipped = torch.zeros_like(mask)
    if dual_clip is not None:
        loss_dual = -advantages * dual_clip  # (B, T-1) = c * |A| where A < 0
        dual_clipped = (advantages < 0) & (loss_per_token > loss_dual)
        loss_per_token = torch.where(dual_clipped, loss_dual, loss_per_token)
    loss = aggregate(loss_per_token, mask, agg, loss_scale_tokens, loss_scale_seqs)
    with torch.no_grad():
        valid_adv = advantages[mask]
        metrics = {
            "policy_loss": loss.detach(),
            "approx_kl": masked_mean(-log_ratio, mask),  # k1 estimate of KL(pi_old || pi)
            "clip_frac": masked_mean(clipped.float(), mask),
            "dual_clip_frac": masked_mean(dual_clipped.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "adv_mean": valid_adv.mean() if valid_adv.numel() else advantages.new_zeros(()),
            "adv_std": valid_adv.std() if valid_adv.numel() > 1 else advantages.new_zeros(()),
            "adv_min": valid_adv.min() if valid_adv.numel() else advantages.new_zeros(()),
            "adv_max": valid_adv.max() if valid_adv.numel() else advantages.new_zeros(()),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# 6. Clipped value loss

def value_loss(values, old_values, returns, mask, clip=0.2, agg="token-mean", loss_scale_tokens=None,
               loss_scale_seqs=None):
    """Clipped value loss (the PPO2 baselines form), values (B, T-1) carrying the gradient:

        V_clip = V_old + clip(V - V_old, -clip, +clip)
        L_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)
    """
    mask = mask.bool()  # (B, T-1)
    values, old_values, returns = values.float(), old_values.detach().float(), returns.detach().float()  # (B, T-1)
    error_unclipped = (values - returns) ** 2  # (B, T-1)
    values_clipped = old_values + (values - old_values).clamp(-clip, clip)  # (B, T-1)
    error_clipped = (values_clipped - returns) ** 2  # (B, T-1)
    loss_per_token = 0.5 * torch.maximum(error_unclipped, error_clipped)
    clipped = error_clipped > error_unclipped
    loss = aggregate(loss_per_token, mask, agg, loss_scale_tokens, loss_scale_seqs)
    with torch.no_grad():
        # explained variance = 1 - Var[R - V] / Var[R]: 1 is perfect, 0 is no better than a constant
        explained_var = 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
        metrics = {
            "value_loss": loss.detach(),
            "value_error": masked_mean(error_unclipped, mask),  # mean squared error over valid tokens
            "value_clip_frac": masked_mean(clipped.float(), mask),
            "explained_var": explained_var,
            "values_mean": masked_mean(values, mask),
            "returns_mean": masked_mean(returns, mask),
        }
    return loss, metrics
