"""PPO for RLVER: critic, rewards per token, GAE, clipped policy and value losses.

One chapter, read top to bottom:
  1. Critic         -- the LM backbone with a scalar value head, one value per target token.
  2. token_rewards  -- the dialogue's reward (final emotion / 100) on the last policy token, plus an
                       optional per-token k1 KL penalty against the reference model.
  3. compute_gae    -- Generalised Advantage Estimation over POLICY tokens only: the user's turns in a
                       multi-turn dialogue are skipped as if they were not there.
  4. masked_mean / masked_whiten / aggregate -- statistics and loss reductions over valid tokens.
  5. policy_loss    -- PPO-clip, with clip-higher (separate low/high ranges) and dual-clip.
  6. value_loss     -- clipped value regression.

Conventions. Every per-token tensor is (B, T-1) and aligned with the targets ids[:, 1:]: column t is
about the token ids[:, t+1], predicted from ids[:, :t+1]. `mask` (B, T-1) marks the tokens the policy
sampled (its <think> and its replies); system, user, template and padding tokens are 0.
Log-probs must be computed at the SAMPLING temperature (logits / temperature before log-softmax), which
is the caller's job: model.token_logprobs(model, ids, temperature=...). Otherwise the ratio pi/pi_old
is measured against a distribution that never produced the samples.
"""
import copy

import torch
import torch.nn as nn

LOG_RATIO_CLAMP = 20.0  # clamp log(pi/pi_old) to +-20 before exp: exp(20) ~ 5e8 stays finite in fp32


# ----------------------------------------------------------------------------------------------------
# 1. Critic


def init_value_head(head: nn.Linear) -> nn.Linear:
    """weight ~ Normal(0, 1/(D+1)), bias 0 (see Critic). Also used by rlver.py for a critic built on meta."""
    nn.init.normal_(head.weight, mean=0.0, std=1.0 / (head.in_features + 1))
    nn.init.zeros_(head.bias)
    return head


class Critic(nn.Module):
    """V(s_t): the policy's Transformer (deep copy, trained separately) with a scalar value head.

    The critic starts from the policy's weights (RLVER, like most RLHF PPO code, initialises the critic
    from the actor). It only asks the copy for its final-norm hidden states, through forward() (so FSDP2's
    forward hooks gather sharded weights), so the copy has no output head (lm_head = None): an untied head
    would be dead weight, all-gathered in every forward and given AdamW state (545M parameters at 7B); a tied
    one is the input embedding, which stays.

    Value head init: weight ~ Normal(0, std=1/(D+1)), bias 0 (the OpenRLHF choice). The final-norm hidden states
    have entries of order 1, so initial values are ~N(0, 1/D): close to zero, a neutral guess for rewards
    in [0, 1]. We do not zero-init the weight: with w = 0 the backbone's gradient dL/dh = dL/dV * w is
    exactly zero on the first update, so the backbone would only start learning after the head moved.

    Build the critic BEFORE sharding the policy (deep-copying an FSDP-wrapped module is not supported);
    shard both afterwards.
    """

    def __init__(self, policy_model: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(policy_model)
        self.backbone.lm_head = None  # the critic reads hidden states only
        self.backbone.requires_grad_(True)
        hidden_size = policy_model.config.hidden_size
        device = next(policy_model.parameters()).device
        # the head stays fp32 even for a bf16 backbone: values are small regression targets
        self.value_head = init_value_head(nn.Linear(hidden_size, 1, device=device, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # the value of target position t (token ids[:, t+1]) is read from the hidden state at t, the state
        # just before that token was sampled -- the same alignment as the log-probs, so like
        # token_logprobs we run the (causal) backbone on ids[:, :-1]: the last token is only a target.
        hidden = self.backbone(ids[:, :-1], return_hidden=True)  # (B, T-1, D) final-norm hidden states
        hidden = hidden.to(self.value_head.weight.dtype)
        return self.value_head(hidden).squeeze(-1)  # (B, T-1)


# ----------------------------------------------------------------------------------------------------
# 2. Rewards per token


@torch.no_grad()
def token_rewards(final_rewards, mask, logprobs=None, ref_logprobs=None, kl_coef=0.0):
    """Per-token rewards (B, T-1): the outcome reward on the last policy token, minus an optional k1 KL.

    final_rewards (B,) is the dialogue's reward, final emotion / 100. A row with no policy token has
    nothing to credit and gets no reward (it also contributes nothing to any loss).

    KL in the reward (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2): r_t -= kl_coef * k1_t with the
    k1 estimator k1_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t) on every policy token.
    """
    mask = mask.bool()  # (B, T-1)
    B, Tm1 = mask.shape
    rewards = torch.zeros(B, Tm1, device=mask.device, dtype=torch.float32)  # (B, T-1)
    positions = torch.arange(Tm1, device=mask.device).expand(B, Tm1)  # (B, T-1)
    last = torch.where(mask, positions, -1).max(dim=1).values  # (B,) last policy position, -1 if none
    has_policy = last >= 0  # (B,)
    rows = torch.arange(B, device=mask.device)[has_policy]
    rewards[rows, last[has_policy]] = final_rewards.float().to(mask.device)[has_policy]
    if kl_coef:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs logprobs and ref_logprobs; pass both or set kl_coef=0")
        k1 = logprobs.float() - ref_logprobs.float()  # (B, T-1)
        rewards = rewards - kl_coef * k1 * mask
    return rewards


# ----------------------------------------------------------------------------------------------------
# 3. GAE over policy tokens only


@torch.no_grad()
def compute_gae(token_rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 11-16) over the policy's tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t                   (TD residual, eq. 12)
        A_t     = delta_t + gamma * lam * A_{t+1}               (eq. 16, as a reverse recursion)
        returns = A_t + V_t                                     (the critic's regression target)

    "t+1" is the NEXT POLICY token: in a multi-turn dialogue the user's turn between two replies is not
    an action of the agent, so at a masked position we carry the next value and the running advantage
    through unchanged (that position does not exist for the recursion). After the last policy token the
    episode has ended: V = 0, A = 0. Rewards at masked positions are ignored (token_rewards puts none).
    With gamma = lam = 1 (the usual choice for outcome rewards) A_t = (sum of later rewards) - V_t.
    Returns (advantages, returns), both (B, T-1), zero / V at masked positions; both carry no gradient.
    """
    mask = mask.bool()  # (B, T-1)
    rewards, values = token_rewards.float(), values.float()  # (B, T-1)
    B, Tm1 = rewards.shape
    next_value = rewards.new_zeros(B)  # (B,) V of the next policy token (0 after the end)
    running = rewards.new_zeros(B)  # (B,) A of the next policy token
    advantages = torch.zeros_like(rewards)  # (B, T-1)
    for t in reversed(range(Tm1)):  # the reverse loop over time; vectorised over the batch
        valid = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * running  # (B,)
        running = torch.where(valid, advantage, running)  # masked: carry A_{t+1} through
        next_value = torch.where(valid, values[:, t], next_value)  # masked: carry V_{t+1} through
        advantages[:, t] = torch.where(valid, advantage, 0.0)
    returns = advantages + values  # (B, T-1)
    return advantages, returns


# ----------------------------------------------------------------------------------------------------
# 4. Statistics and loss reductions over valid tokens


def masked_mean(x, mask, dim=None, reduce=None):
    """Mean of x over positions where mask is 1 (all dims, or along `dim`); 0 where nothing is valid.
    reduce: sums a tensor across processes (rlver.sum_over_ranks), so the mean is over the global batch."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return total / count.clamp(min=1)


def masked_var(x, mask, unbiased=True, reduce=None):
    """Variance of x over valid positions (Bessel-corrected by default; 0 for fewer than 2 values)."""
    mask = mask.to(x.dtype)
    count = mask.sum() if reduce is None else reduce(mask.sum())
    centered = (x - masked_mean(x, mask, reduce=reduce)) * mask
    squares = (centered**2).sum() if reduce is None else reduce((centered**2).sum())
    denom = (count - 1) if unbiased else count
    return squares / denom.clamp(min=1)


def masked_whiten(x, mask, eps=1e-8, reduce=None):
    """(x - mean) / std using statistics of the valid positions only; masked positions come out 0.

    Padding and user tokens must not enter the statistics: their advantages are 0 and would pull the mean
    toward 0 and shrink the std. reduce (see masked_mean): statistics over the valid tokens of every rank,
    so the whitening does not depend on how the batch is split across processes.
    """
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# Loss aggregation and the global normaliser.
# "token-mean" = sum of per-token losses over the whole step / N, N = valid tokens of the GLOBAL batch
# (every micro-batch on every rank). "seq-mean-token-mean" (the original GRPO, Shao et al. 2024, eq. 3)
# = sum over sequences of (mean over that sequence's tokens) / S, S = number of non-empty sequences of
# the global batch. Dividing each micro-batch by its OWN count instead weights tokens unequally whenever
# micro-batches differ in length.
# How the caller sets the scales, with K grad-accumulation micro-batches on each of W ranks:
#   N_global = all_reduce(sum over the step's micro-batches of mask.sum())      (same for S_global)
#   loss_scale_tokens = N_global / W,   loss_scale_seqs = S_global / W,
# then calls backward() on each micro-batch loss WITHOUT dividing by K. DDP/FSDP averages gradients over
# ranks (divides by W), so the final gradient is d/dtheta [sum of all per-token losses / N_global].
# Single process, no accumulation: leave them None (the local counts, N = mask.sum()).


def aggregate(loss_per_token, mask, agg="token-mean", loss_scale_tokens=None, loss_scale_seqs=None):
    """Reduce a (B, T-1) per-token loss to a scalar over valid tokens (see the note above)."""
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
    Dual-clip (Ye et al. 2020, eq. 5): for A < 0 the ratio is unbounded above, so one bad token can give
    a huge loss; bound it: L_t = min(L_t, -dual_clip * A_t) = min(L_t, c * |A_t|), with c > 1 (e.g. 3).
    Where a bound is active the loss is constant in logprobs: that token gets no gradient.
    logprobs (B, T-1) carries the gradient; old_logprobs and advantages (B, T-1) are constants.
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
    """Clipped value loss (the PPO2 baselines form; Schulman et al. 2017, sec. 5 uses plain MSE):

        V_clip = V_old + clip(V - V_old, -clip, +clip)
        L_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    The critic cannot move a value further than `clip` from the value used to compute the advantages in
    one update. clip=None gives 0.5 * (V - R)^2. values (B, T-1) carries the gradient.
    """
    mask = mask.bool()  # (B, T-1)
    values = values.float()
    old_values, returns = old_values.detach().float(), returns.detach().float()  # (B, T-1)
    error_unclipped = (values - returns) ** 2  # (B, T-1)
    if clip is None:
        loss_per_token, clipped = 0.5 * error_unclipped, torch.zeros_like(mask)
    else:
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
