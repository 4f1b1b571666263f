"""Tests for ppo.py against hand-worked numbers and an independent per-sequence GAE."""
import math

import pytest
import torch

from ppo import (aggregate, compute_gae, masked_mean, masked_var, masked_whiten, policy_loss,
                 token_rewards, value_loss)


# ---------------------------------------------------------------------------------------------------
# token_rewards


def test_token_rewards_outcome_on_last_policy_token_and_k1_kl():
    # row 0: prompt, reply (1, 2), user gap (3), reply (4), padding (5) -> last policy token at 4
    # row 1: no policy token at all -> nothing to credit
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    rewards = token_rewards(torch.tensor([0.7, 0.9]), mask)
    expected = torch.zeros(2, 6)
    expected[0, 4] = 0.7
    assert torch.equal(rewards, expected)

    # k1 KL in the reward: logp - ref = -1 - (-1.5) = 0.5 on every token; kl_coef 0.1 -> -0.05 on each
    # POLICY token (masked positions stay 0 even though their logp differs from ref)
    logprobs, ref = torch.full((2, 6), -1.0), torch.full((2, 6), -1.5)
    rewards = token_rewards(torch.tensor([0.7, 0.9]), mask, logprobs, ref, kl_coef=0.1)
    expected = torch.tensor([[0, -0.05, -0.05, 0, 0.7 - 0.05, 0], [0, 0, 0, 0, 0, 0]])
    assert torch.allclose(rewards, expected, atol=1e-7)

    with pytest.raises(ValueError, match="ref_logprobs"):
        token_rewards(torch.tensor([0.7, 0.9]), mask, kl_coef=0.1)


# ---------------------------------------------------------------------------------------------------
# GAE


def test_gae_hand_worked_with_user_gap_and_padding():
    # Positions: 0 policy, 1 user token (masked), 2 policy, 3 policy (last), 4 padding (masked).
    # Masked positions hold junk values (9.0, 7.0) and a junk reward (5.0) that must be ignored.
    mask = torch.tensor([[1, 0, 1, 1, 0]])
    values = torch.tensor([[0.5, 9.0, 0.2, 0.4, 7.0]])
    rewards = torch.tensor([[0.0, 5.0, 0.0, 1.0, 5.0]])

    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72). The recursion only sees positions 0, 2, 3:
    #   t=3: delta = 1 + 0.9*0 - 0.4   = 0.6    A3 = 0.6
    #   t=2: delta = 0 + 0.9*0.4 - 0.2 = 0.16   A2 = 0.16 + 0.72*0.6   = 0.592
    #   t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32  A0 = -0.32 + 0.72*0.592 = 0.10624
    # returns = A + V: 0.60624, 0.792, 1.0
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.10624, 0.0, 0.592, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret[mask.bool()], torch.tensor([0.60624, 0.792, 1.0]), atol=1e-6)

    # gamma = lam = 1: A_t = (sum of later rewards = 1) - V_t -> 0.5, 0.8, 0.6; every return is 1
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0, 0.8, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret[mask.bool()], torch.ones(3), atol=1e-6)


def reference_gae(rewards, values, mask, gamma, lam):
    """Independent GAE: per row, keep only the valid positions, then the closed form of eq. 16
    A_k = sum_l (gamma*lam)^l delta_{k+l}, with delta_k = r_k + gamma V_{k+1} - V_k and V_n = 0."""
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        v = [float(values[b, t]) for t in idx] + [0.0]
        r = [float(rewards[b, t]) for t in idx]
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
        for k, t in enumerate(idx):
            out[b, t] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(idx) - k))
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8)])
def test_gae_matches_per_sequence_reference_on_multi_turn_layout(gamma, lam):
    torch.manual_seed(0)
    # (B, T-1) layouts: 0 = system/user/template/padding, 1 = policy-sampled
    mask = torch.tensor([
        [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0],  # prompt, reply, user turn, reply, padding
        [0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0],  # three replies, two user turns, padding
        [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # one reply, no padding
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no policy tokens
    ])
    values = torch.randn(4, 14)  # junk at masked positions too
    final = torch.tensor([0.3, 1.0, 0.55, 0.8])
    logprobs, ref = torch.randn(4, 14), torch.randn(4, 14)
    rewards = token_rewards(final, mask, logprobs, ref, kl_coef=0.05)  # dense KL makes every delta differ

    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = reference_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv.double(), expected, atol=1e-5)
    assert torch.equal(adv[~mask.bool()], torch.zeros((~mask.bool()).sum().item()))
    assert torch.allclose(ret, adv + values)  # returns = advantages + values

    # junk at masked positions (values, rewards) does not leak into the valid advantages
    junk = ~mask.bool()
    adv2, _ = compute_gae(rewards + 3.0 * junk, values + 5.0 * junk, mask, gamma=gamma, lam=lam)
    assert torch.allclose(adv2, adv, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# masked statistics


def test_masked_mean_var_whiten_ignore_masked_positions():
    x = torch.tensor([[1.0, 100.0, 2.0], [3.0, -50.0, 0.0]])
    mask = torch.tensor([[1, 0, 1], [1, 0, 0]])
    # valid values 1, 2, 3: mean 2; unbiased var ((1-2)^2 + 0 + (3-2)^2) / (3-1) = 1
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    # whitened: (x - 2) / 1 at valid positions -> -1, 0, 1; masked positions -> 0
    w = masked_whiten(x, mask)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)
    # an empty mask gives 0, not nan
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------------------------------------------
# PPO-clip policy loss: one token, old logp = 0, so ratio = exp(logp)


def one_token(ratio, advantage, **kwargs):
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]),
                                torch.ones(1, 1), **kwargs)
    loss.backward()
    return loss.item(), logprobs.grad.item(), metrics


def test_ppo_clip_positive_advantage():
    # A = +2, eps = 0.2. L = max(-A r, -A clip(r, 0.8, 1.2)); dL/dlogp = -A r where unclipped
    loss, grad, m = one_token(1.5, 2.0)  # r > 1.2: max(-3, -2.4) = -2.4, clipped -> no gradient
    assert loss == pytest.approx(-2.4) and grad == 0.0 and m["clip_frac"].item() == 1.0
    loss, grad, m = one_token(1.1, 2.0)  # inside: -2.2, grad -2.2
    assert loss == pytest.approx(-2.2) and grad == pytest.approx(-2.2) and m["clip_frac"].item() == 0.0
    loss, grad, _ = one_token(0.5, 2.0)  # r < 0.8 with A > 0 is NOT clipped: max(-1, -1.6) = -1
    assert loss == pytest.approx(-1.0) and grad == pytest.approx(-1.0)


def test_ppo_clip_negative_advantage():
    # A = -2: L = max(2r, 2 clip(r, 0.8, 1.2))
    loss, grad, m = one_token(0.5, -2.0)  # r < 0.8: max(1, 1.6) = 1.6, clipped -> no gradient
    assert loss == pytest.approx(1.6) and grad == 0.0 and m["clip_frac"].item() == 1.0
    loss, grad, _ = one_token(0.9, -2.0)  # inside: 1.8, grad 1.8
    assert loss == pytest.approx(1.8) and grad == pytest.approx(1.8)
    loss, grad, _ = one_token(1.5, -2.0)  # r > 1.2 with A < 0 is NOT clipped: max(3, 2.4) = 3
    assert loss == pytest.approx(3.0) and grad == pytest.approx(3.0)


def test_clip_higher_is_asymmetric():
    # clip_low = 0.2, clip_high = 0.28: ratio range [0.8, 1.28]
    loss, grad, _ = one_token(1.25, 1.0, clip_low=0.2, clip_high=0.28)  # inside the wider upper range
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)
    loss, grad, _ = one_token(1.25, 1.0)  # the same token under symmetric 0.2 is clipped at 1.2
    assert loss == pytest.approx(-1.2) and grad == 0.0
    loss, grad, _ = one_token(1.3, 1.0, clip_low=0.2, clip_high=0.28)  # above 1.28: -1.28, clipped
    assert loss == pytest.approx(-1.28) and grad == 0.0
    loss, grad, _ = one_token(0.75, -1.0, clip_low=0.2, clip_high=0.28)  # lower bound still 0.8
    assert loss == pytest.approx(0.8) and grad == 0.0
    loss, grad, _ = one_token(0.85, -1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.85) and grad == pytest.approx(0.85)


def test_dual_clip_bounds_negative_advantage_loss():
    # A = -1, r = 5: plain PPO loss max(5, 1.2) = 5 with gradient 5; dual-clip c = 3 bounds it at c|A| = 3
    loss, grad, _ = one_token(5.0, -1.0)
    assert loss == pytest.approx(5.0) and grad == pytest.approx(5.0)
    loss, grad, m = one_token(5.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0 and m["dual_clip_frac"].item() == 1.0
    loss, grad, m = one_token(2.0, -1.0, dual_clip=3.0)  # 2 < 3: untouched
    assert loss == pytest.approx(2.0) and grad == pytest.approx(2.0) and m["dual_clip_frac"].item() == 0.0
    loss, grad, _ = one_token(5.0, 1.0, dual_clip=3.0)  # A > 0: dual-clip does not apply; clipped -1.2
    assert loss == pytest.approx(-1.2) and grad == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        one_token(1.0, 1.0, dual_clip=0.5)


def test_log_ratio_is_clamped_before_exp():
    # logp - old = 100 would overflow exp in fp32; clamped to 20 -> loss = |A| e^20, finite
    logprobs = torch.tensor([[100.0]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_policy_metrics_over_valid_tokens_only():
    # two valid tokens: ratios 1.5 (A=+1, clipped) and 1.0 (A=-3); a masked token with a wild ratio
    logprobs = torch.tensor([[math.log(1.5), 0.0, 10.0]])
    advantages = torch.tensor([[1.0, -3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    _, m = policy_loss(logprobs, torch.zeros(1, 3), advantages, mask)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx(1.25)
    assert m["approx_kl"].item() == pytest.approx(-math.log(1.5) / 2)
    assert m["adv_mean"].item() == pytest.approx(-1.0)
    assert m["adv_min"].item() == -3.0 and m["adv_max"].item() == 1.0
    assert m["adv_std"].item() == pytest.approx(math.sqrt(8.0))  # unbiased: (4 + 4) / 1


# ---------------------------------------------------------------------------------------------------
# clipped value loss


def one_value(v, old=0.5, ret=1.0, clip=0.2):
    values = torch.tensor([[v]], requires_grad=True)
    loss, metrics = value_loss(values, torch.tensor([[old]]), torch.tensor([[ret]]), torch.ones(1, 1), clip=clip)
    loss.backward()
    return loss.item(), values.grad.item(), metrics


def test_value_loss_clipping():
    # V_old = 0.5, R = 1, clip 0.2 -> V_clip in [0.3, 0.7]
    loss, grad, m = one_value(0.9)  # max((0.9-1)^2, (0.7-1)^2) = 0.09 -> 0.045, constant in V
    assert loss == pytest.approx(0.045) and grad == 0.0 and m["value_clip_frac"].item() == 1.0
    loss, grad, _ = one_value(0.6)  # inside the range: 0.5 * 0.4^2 = 0.08, grad V - R = -0.4
    assert loss == pytest.approx(0.08) and grad == pytest.approx(-0.4)
    loss, grad, _ = one_value(0.2)  # moved away from R: max(0.64, 0.49) -> 0.32, grad -0.8 (still pulled)
    assert loss == pytest.approx(0.32) and grad == pytest.approx(-0.8)
    loss, grad, _ = one_value(0.9, clip=float("inf"))  # no clipping: 0.5 * 0.01
    assert loss == pytest.approx(0.005) and grad == pytest.approx(-0.1)


def test_value_metrics_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    _, m = value_loss(returns.clone(), returns, returns, mask)  # perfect critic
    assert m["explained_var"].item() == pytest.approx(1.0) and m["value_error"].item() == 0.0
    _, m = value_loss(torch.full((1, 4), 2.0), returns, returns, mask)  # constant = mean of returns
    # Var[R - V] = Var[R] -> 0; squared errors 1, 0, 1 -> mean 2/3
    assert m["explained_var"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["value_error"].item() == pytest.approx(2.0 / 3.0)


# ---------------------------------------------------------------------------------------------------
# loss aggregation and micro-batching


def test_token_mean_vs_seq_mean_token_mean():
    # sequence 0 has one token with loss 4; sequence 1 has three tokens with losses 1, 2, 3
    loss = torch.tensor([[4.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10.0 / 4)  # (4+1+2+3)/4 = 2.5
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)  # (4 + 2)/2
    assert aggregate(loss, mask, "token-mean", loss_scale_tokens=8).item() == pytest.approx(10.0 / 8)
    assert aggregate(loss, mask, "seq-mean-token-mean", loss_scale_seqs=4).item() == pytest.approx(6.0 / 4)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(loss, mask, "seq-sum")


def random_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Tm1 = 4, 7
    # very different lengths per row so per-micro-batch normalisation would be visibly wrong
    lengths = [1, 2, 6, 7]
    mask = torch.tensor([[1 if t < n else 0 for t in range(Tm1)] for n in lengths])
    old = -torch.rand(B, Tm1, generator=g)
    logprobs = (old + 0.3 * torch.randn(B, Tm1, generator=g)).requires_grad_(True)
    advantages = torch.randn(B, Tm1, generator=g)
    return logprobs, old, advantages, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_global_count_equal_full_batch(agg):
    logprobs, old, advantages, mask = random_batch()
    full, _ = policy_loss(logprobs, old, advantages, mask, agg=agg)
    (grad_full,) = torch.autograd.grad(full, logprobs)

    n_tokens, n_seqs = mask.sum().item(), 4  # global counts for the whole step
    total, grad_sum = 0.0, torch.zeros_like(logprobs)
    local_total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):  # two grad-accumulation micro-batches
        part, _ = policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], agg=agg,
                              loss_scale_tokens=n_tokens, loss_scale_seqs=n_seqs)
        grad_sum += torch.autograd.grad(part, logprobs)[0]
        total += part.item()
        local, _ = policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], agg=agg)
        local_total += local.item() / 2  # the naive "average of micro-batch means"
    assert total == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(grad_sum, grad_full, atol=1e-7)
    if agg == "token-mean":  # the naive way is wrong here (micro-batches have 3 and 13 tokens)
        assert local_total != pytest.approx(full.item(), rel=1e-3)

    # two data-parallel ranks, one micro-batch each: pass N / world_size, then average grads like DDP/FSDP
    world = 2
    grads = []
    for rows in (slice(0, 2), slice(2, 4)):
        part, _ = policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], agg=agg,
                              loss_scale_tokens=n_tokens / world, loss_scale_seqs=n_seqs / world)
        grads.append(torch.autograd.grad(part, logprobs)[0])
    assert torch.allclose(sum(grads) / world, grad_full, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Critic on a tiny real checkpoint


def test_critic_shape_alignment_and_gradients(tiny_qwen2):
    from model import load_model

    from ppo import Critic

    policy = load_model(tiny_qwen2)
    policy.requires_grad_(False)  # e.g. a frozen copy: the critic must still be trainable
    critic = Critic(policy)
    vocab = policy.config.vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))  # (B, T)
    values = critic(ids)
    assert values.shape == (2, 8)  # (B, T-1), like token_logprobs

    # column t is the value head on the hidden state at position t (the state before target ids[:, t+1]);
    # at init the backbone equals the policy, so the policy's hidden states give the same numbers
    hidden = policy(ids, return_hidden=True)  # (B, T, D)
    assert torch.allclose(values, critic.value_head(hidden[:, :-1]).squeeze(-1), atol=1e-6)

    # causality: column t depends only on ids[:, :t+1]. Changing token 5 leaves columns 0..4 unchanged and
    # moves column 5; changing the LAST token (a target only) changes no value at all.
    changed = ids.clone()
    changed[:, 5] = (ids[:, 5] + 1) % vocab
    moved = critic(changed)
    assert torch.allclose(moved[:, :5], values[:, :5], atol=1e-6)
    assert (moved[:, 5] - values[:, 5]).abs().min() > 1e-6
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % vocab
    assert torch.allclose(critic(changed), values, atol=1e-6)

    # gradient reaches the head and every backbone weight (lm_head is unused by the critic) ...
    (values**2).sum().backward()
    assert critic.value_head.weight.grad.abs().sum() > 0 and critic.value_head.bias.grad.abs() > 0
    for name, p in critic.backbone.named_parameters():
        if not name.startswith("lm_head"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # ... and the critic is a copy: no parameter is shared with the policy, which got no gradient
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not any(p.data_ptr() in policy_ptrs for p in critic.parameters())
    assert all(p.grad is None for p in policy.parameters())
    # value head init: bias 0, small weights (std 1/(D+1)), so initial values are near 0
    assert torch.equal(critic.value_head.bias.detach(), torch.zeros(1))
    assert critic.value_head.weight.std().item() < 3.0 / (policy.config.hidden_size + 1)


def test_untied_critic_has_no_output_head(tiny_checkpoints):
    # the critic reads hidden states only: its parameters are the backbone without lm_head plus the value head
    from model import load_model

    from ppo import Critic

    policy = load_model(tiny_checkpoints["llama"])  # untied head (Llama)
    cfg = policy.config
    assert not cfg.tie_word_embeddings
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    head = cfg.vocab_size * cfg.hidden_size
    critic = Critic(policy)
    assert count(critic) == count(policy) - head + cfg.hidden_size + 1
    assert not any(k.startswith("backbone.lm_head") for k in critic.state_dict())
