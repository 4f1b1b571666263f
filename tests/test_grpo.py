"""Tests for grpo.py against hand-worked numbers."""
import math

import pytest
import torch

from grpo import group_advantages, grpo_loss, k3_kl


def ids(n, group_size):
    """The trainer's layout: rows i*G .. (i+1)*G - 1 are group i."""
    return torch.arange(n) // group_size


def test_group_advantages_hand_worked():
    rewards = torch.tensor([
        0.0, 1.0, 1.0, 0.0,  # group 0: mean 0.5; unbiased var (4 * 0.25) / 3 = 1/3 -> std 1/sqrt(3)
        0.3, 0.3, 0.3, 0.3,  # group 1: all equal -> exactly zero
        0.2, 0.6, 0.4, 0.4,  # group 2: mean 0.4; unbiased var (0.04 + 0.04) / 3 -> std 0.163299
    ])
    adv = group_advantages(rewards, ids(12, 4))
    s3 = math.sqrt(3) / 2  # 0.5 / (1/sqrt(3)) = 0.866025
    s = 0.2 / math.sqrt(0.08 / 3)  # 0.2 / 0.163299 = 1.224745
    expected = torch.tensor([-s3, s3, s3, -s3, 0, 0, 0, 0, -s, s, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-4)  # eps = 1e-6 shifts the 5th digit at most
    assert torch.equal(adv[4:8], torch.zeros(4))

    # Dr.GRPO: no std division -> r - mean
    adv = group_advantages(rewards, ids(12, 4), scale_by_std=False)
    expected = torch.tensor([-0.5, 0.5, 0.5, -0.5, 0, 0, 0, 0, -0.2, 0.2, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))

    # G = 3: [0, 0.5, 1] -> mean 0.5, unbiased std sqrt((0.25 + 0 + 0.25) / 2) = 0.5 -> [-1, 0, 1]
    adv = group_advantages(torch.tensor([0.0, 0.5, 1.0]), ids(3, 3))
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5)


def test_equal_group_is_exactly_zero_even_when_float_mean_is_off():
    # In fp32, mean([0.11, 0.11, 0.11]) != 0.11 by one ulp; (r - mean) / (std + 1e-6) would then be ~0.007
    # for every rollout, a spurious signal. The group must give exact zeros.
    rewards = torch.tensor([0.11, 0.11, 0.11])
    assert (rewards - rewards.mean()).abs().max() > 0  # the rounding this test guards against is real
    assert torch.equal(group_advantages(rewards, ids(3, 3)), torch.zeros(3))
    assert torch.equal(group_advantages(rewards, ids(3, 3), scale_by_std=False), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([0.7, 0.2]), ids(2, 1)), torch.zeros(2))


def test_near_equal_group_shows_eps():
    # rewards 1/2, 1/2, 1/2, 1/2 + 2^-20 (exact in fp32): mean 1/2 + 2^-22, deviations -2^-22 (x3) and
    # +3 * 2^-22, unbiased var (3 + 9) * 2^-44 / 3 = 2^-42, std 2^-21 (all exact). With eps = 1e-6 the
    # advantages are (-1, -1, -1, 3) * 2^-22 / (2^-21 + 1e-6) = (-1, -1, -1, 3) * 0.161440; without eps they
    # would be (-1, -1, -1, 3) / 2: the eps keeps a group that is equal but for noise from a full-size signal.
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5 + 2 ** -20])
    a = 2 ** -22 / (2 ** -21 + 1e-6)
    assert a == pytest.approx(0.161440, rel=1e-5)
    torch.testing.assert_close(group_advantages(rewards, ids(4, 4)), torch.tensor([-a, -a, -a, 3 * a]),
                               rtol=1e-6, atol=0)


def test_group_ids_two_groups_hand_worked_and_valid_rows():
    # group 7 = rows 0-2 [0.2, 0.8, 0.5]: mean 0.5, unbiased std sqrt((0.09 + 0.09 + 0) / 2) = 0.3 -> [-1, 1, 0];
    # group 3 = rows 3-4 [1, 0]: mean 0.5, std sqrt(0.5) -> +-0.5 / 0.707107 = +-0.707107. Any ids, any order of
    # groups, groups of different sizes; row 5 is not valid: no part in any statistics, advantage 0.
    rewards = torch.tensor([0.2, 0.8, 0.5, 1.0, 0.0, 9.0])
    adv = group_advantages(rewards, torch.tensor([7, 7, 7, 3, 3, 7]), torch.tensor([1, 1, 1, 1, 1, 0]).bool())
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.707107, -0.707107, 0.0]), rtol=0, atol=1e-5)
    adv = group_advantages(rewards[:5], torch.tensor([7, 7, 7, 3, 3]), scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([-0.3, 0.3, 0.0, 0.5, -0.5]), rtol=0, atol=1e-6)


def test_non_contiguous_group_layout_raises():
    # a shuffled batch: group 0's rows are 0 and 2, group 1's 1 and 3 -- the layout the trainer never makes
    with pytest.raises(ValueError, match="each group's rows must be contiguous"):
        group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="contiguous"):  # a valid row after an invalid one still counts
        group_advantages(torch.zeros(3), torch.tensor([0, 1, 0]), torch.tensor([True, True, True]))
    # an invalid row (strip mode's padding sample, dialogue 0) breaks no layout: it takes no part
    group_advantages(torch.zeros(3), torch.tensor([0, 1, 0]), torch.tensor([True, True, False]))


def test_k3_kl_known_value_nonnegative_and_clamped():
    # log_r = ref - logp = log 2 -> k3 = e^{log 2} - log 2 - 1 = 1 - log 2 = 0.306853
    logprobs, ref = torch.tensor([[0.0]]), torch.tensor([[math.log(2.0)]])
    assert k3_kl(logprobs, ref).item() == pytest.approx(1.0 - math.log(2.0), rel=1e-6)
    # log_r = -log 2 -> k3 = 1/2 + log 2 - 1 = 0.193147
    assert k3_kl(ref, logprobs).item() == pytest.approx(0.5 + math.log(2.0) - 1.0, rel=1e-6)
    torch.manual_seed(0)
    a, b = 3 * torch.randn(64, 32), 3 * torch.randn(64, 32)
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(64, 32))  # zero at equality
    # log_r = 50: exp would be 5e21; clamped log_r = 20 then k3 clamped to 10
    assert k3_kl(torch.tensor([[0.0]]), torch.tensor([[50.0]])).item() == 10.0


def test_grpo_loss_one_token_hand_worked():
    # ratio 1 (logp = old), A = 1, ref - logp = log 2, kl_coef = 0.1:
    # loss = -A * 1 + 0.1 * (1 - log 2) = -1 + 0.0306853; dL/dlogp = -A * ratio + 0.1 * dk3/dlogp,
    # dk3/dlogp = -(e^{log_r} - 1) = -(2 - 1) = -1 -> grad = -1 - 0.1 = -1.1
    logprobs = torch.tensor([[0.0]], requires_grad=True)
    loss, m = grpo_loss(logprobs, torch.zeros(1, 1), torch.tensor([[math.log(2.0)]]), torch.tensor([[1.0]]),
                        torch.ones(1, 1), kl_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0 + 0.1 * (1.0 - math.log(2.0)), rel=1e-6)
    assert logprobs.grad.item() == pytest.approx(-1.1, rel=1e-6)
    assert m["kl"].item() == pytest.approx(1.0 - math.log(2.0), rel=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, torch.zeros(1, 1), None, torch.tensor([[1.0]]), torch.ones(1, 1), kl_coef=0.1)


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Tm1 = 4, 6
    mask = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    old = -torch.rand(B, Tm1, generator=g)
    logprobs = (old + 0.3 * torch.randn(B, Tm1, generator=g)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(B, Tm1, generator=g)
    advantages = group_advantages(torch.tensor([0.2, 0.9, 0.5, 0.5]), ids(4, 2))  # (B,)
    assert torch.equal(advantages[2:], torch.zeros(2))  # the equal group [0.5, 0.5]
    return logprobs, old, ref, advantages[:, None].expand(B, Tm1), mask  # every token shares its rollout's A


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_micro_batches_with_global_count_equal_full_batch(agg):
    logprobs, old, ref, advantages, mask = make_batch()
    full, _ = grpo_loss(logprobs, old, ref, advantages, mask, kl_coef=0.1, agg=agg)
    (grad_full,) = torch.autograd.grad(full, logprobs)
    total, grad_sum = 0.0, torch.zeros_like(logprobs)
    for rows in (slice(0, 1), slice(1, 4)):  # micro-batches of 1 and 3 rows: 1 vs 12 tokens
        part, _ = grpo_loss(logprobs[rows], old[rows], ref[rows], advantages[rows], mask[rows], kl_coef=0.1,
                            agg=agg, loss_scale_tokens=mask.sum().item(), loss_scale_seqs=4)
        grad_sum += torch.autograd.grad(part, logprobs)[0]
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)  # the loss is a small sum of +- terms
    assert torch.allclose(grad_sum, grad_full, atol=1e-7)


def test_strip_mode_groups_every_turn_sample_of_a_profile():
    # --think-history strip, GRPO: the statistics run over the TURN samples of a profile's group, as the
    # official think trainer groups them. Group 0 = dialogues 0 (reward 1, 3 turns) and 1 (reward 0, 1 turn):
    # samples [1, 1, 1, 0], mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5 -> [0.5]*3, -1.5
    # (per dialogue it would be +-0.7071). Group 1 = dialogues 2, 3, both 0.4: exactly zero. The last row is
    # a padding sample (no policy token, dialogue 0): it takes no part and gets nothing.
    import argparse
    import rlver
    dialogue = torch.tensor([0, 0, 0, 1, 2, 3, 3, 0])
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[-1] = False
    args = argparse.Namespace(algo="grpo", think_history="strip", group_size=2, no_std=False)
    adv = rlver.advantages(None, args, {"mask": mask, "dialogue": dialogue}, torch.tensor([1.0, 0.0, 0.4, 0.4]))
    expected = torch.tensor([0.5, 0.5, 0.5, -1.5, 0, 0, 0, 0])[:, None] * mask
    assert torch.allclose(adv, expected, atol=1e-5)
    args.think_history = "keep"   # one sample per dialogue: the per-dialogue statistics
    keep = rlver.advantages(None, args, {"mask": mask[:4], "dialogue": torch.arange(4)}, torch.tensor([1.0, 0.0, 0.4, 0.4]))
    assert torch.allclose(keep[:, 0], torch.tensor([0.70711, -0.70711, 0, 0]), atol=1e-4)
