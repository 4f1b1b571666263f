"""GRPO for RLVER: no critic; the baseline is the other rollouts of the same user profile.

For each profile we run G dialogues (the RLVER scripts use G = 4). Each dialogue gets one reward
(final emotion / 100); its advantage is that reward measured against its group (Shao et al. 2024,
"DeepSeekMath", eq. 3 and sec. 4.1.2, outcome supervision), and every policy token of the dialogue
shares it. The KL to the reference model is a loss term (the k3 estimator), not a reward penalty.
The clipped surrogate, the loss aggregation and the conventions (per-token tensors (B, T-1) aligned with
ids[:, 1:], `mask`, log-probs at the sampling temperature) are PPO's, from ppo.py.
"""
import torch

from ppo import LOG_RATIO_CLAMP, aggregate, masked_mean, policy_loss

K3_CLAMP = 10.0  # bound on the per-token k3 value, so one wild token cannot dominate the KL term


def check_group_layout(groups):
    """The layout the trainer makes and the advantage relies on: each group's rows are contiguous (rows i*G ..
    (i+1)*G - 1 are the G rollouts of profile i; under strip, a dialogue's turn samples follow each other).
    groups (S,) long. Raises ValueError naming the broken invariant."""
    run_starts = torch.diff(groups, prepend=groups[:1] - 1) != 0  # (S,) a row whose group differs from the one before
    ids, runs = groups[run_starts].unique(return_counts=True)  # the runs of consecutive rows of each group
    if (runs > 1).any():
        raise ValueError(f"group layout broken: each group's rows must be contiguous, but the rows of group "
                         f"{ids[runs > 1][0].item()} come in {runs[runs > 1][0].item()} separate runs")


@torch.no_grad()
def group_advantages(rewards, groups, valid=None, eps=1e-6, scale_by_std=True):
    """Group-relative advantage (GRPO, Shao et al. 2024, sec. 4.1.2): A_i = (r_i - mean(r)) / (std(r) + eps), std
    unbiased; scale_by_std=False: A_i = r_i - mean(r) (Dr.GRPO, Liu et al. 2025: the std up-weights nearly all-equal
    groups). rewards (S,); groups (S,) long, each row's group id; valid (S,) bool, the rows that take part (others
    get 0, and are not checked).
    Under --think-history strip the rows are turn samples carrying their dialogue's reward, grouped by profile
    as the official think trainer (verl's GRPO over the expanded batch) does: a dialogue with more turns weighs
    more. A group whose rewards are all equal gets EXACTLY zero: the float mean of equal values can be an ulp
    off, which divided by a std of ~1e-9 + eps would become an advantage of order 1e-3.
    """
    rewards = rewards.float()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.to(rewards.device)
    groups = groups.to(rewards.device)
    check_group_layout(groups[valid])
    advantages = torch.zeros_like(rewards)  # (S,)
    for g in groups[valid].unique():
        rows = valid & (groups == g)
        r = rewards[rows]  # (n,) the group's rows
        a = r - r.mean()
        if scale_by_std and r.numel() > 1:
            a = a / (r.std(unbiased=True) + eps)
        advantages[rows] = 0.0 if (r == r[0]).all() else a
    return advantages  # (S,)


def k3_kl(logprobs, ref_logprobs):
    """Per-token KL(pi || pi_ref) estimate, k3 (Schulman 2020, "Approximating KL divergence").

    With tokens sampled from pi and log_r = log pi_ref - log pi:  k3 = exp(log_r) - log_r - 1.
    Unbiased, and >= 0 for every token (e^x >= 1 + x), unlike k1 = -log_r. log_r is clamped to +-20
    before exp and k3 to [-10, 10] (in practice [0, 10]), as public GRPO code does. (B, T-1).
    """
    log_r = (ref_logprobs.float() - logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T-1)
    return (torch.exp(log_r) - log_r - 1.0).clamp(-K3_CLAMP, K3_CLAMP)  # (B, T-1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2,
              kl_coef=1e-3, agg="token-mean", loss_scale_tokens=None, loss_scale_seqs=None, dual_clip=None):
    """GRPO objective (Shao et al. 2024, eq. 3), as a loss to minimise:

        L = aggregate( PPO-clip_t(ratio_t, A_i)  +  kl_coef * k3_t )

    advantages: (B, T-1), a rollout's advantage on each of its tokens (the (B,) group advantages broadcast).
    The original GRPO aggregates "seq-mean-token-mean"; "token-mean" (the default) weights every token
    equally, which avoids favouring short answers (DAPO; Dr.GRPO). Both terms use the same aggregation
    and normaliser, so the loss is linear in the per-token terms and micro-batches add up exactly.
    ref_logprobs may be None when kl_coef == 0.
    """
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs; pass them or set kl_coef=0")
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg,
                                loss_scale_tokens, loss_scale_seqs)
    if ref_logprobs is not None:  # (logged at kl_coef 0 too)
        kl = k3_kl(logprobs if kl_coef else logprobs.detach(), ref_logprobs)  # (B, T-1)
        if kl_coef:
            loss = loss + kl_coef * aggregate(kl, mask, agg, loss_scale_tokens, loss_scale_seqs)
        metrics["kl"] = masked_mean(kl.detach(), mask)
    metrics["loss"] = loss.detach()
    return loss, metrics
