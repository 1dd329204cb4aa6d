"""Hand-computed checks of the BPO math (r4b_core/bpo_math.py).

Every expected number below was worked out on paper; the comments show the arithmetic.
"""

import math

import pytest
import torch

from r4b_core import bpo_math as bm

T, F = True, False


# --- advantages -------------------------------------------------------------------------------
def test_mixed_group_equal_split_gives_plus_minus_one():
    # rewards {1,1,0,0}: mean 0.5, population std 0.5 -> (r - 0.5) / 0.5 = +-1
    adv = bm.group_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[T, T, F, F]]))
    assert torch.allclose(adv.values, torch.tensor([[1.0, 1.0, -1.0, -1.0]]), atol=1e-5)
    assert adv.informative.tolist() == [True]


def test_mixed_group_one_of_four():
    # rewards {1,0,0,0}: mean .25, var = (.75^2 + 3 * .25^2) / 4 = .1875, std = .4330127
    # A = .75 / .4330127 = 1.7320508 (= sqrt 3), -.25 / .4330127 = -.5773503 (= -1/sqrt 3)
    adv = bm.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    s3 = math.sqrt(3)
    assert torch.allclose(adv.values, torch.tensor([[s3, -1 / s3, -1 / s3, -1 / s3]]), atol=1e-6)
    assert adv.group_mean[0, 0].item() == pytest.approx(0.25)
    assert adv.group_std[0, 0].item() == pytest.approx(0.4330127, abs=1e-6)


def test_mixed_vs_per_mode_when_thinking_always_wins():
    # think rollouts all right, no-think all wrong: the mixed group sees the cross-mode contrast
    # (+1 / -1); per-mode groups are each constant, so they see nothing and the prompt is dropped.
    r = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    think = torch.tensor([[T, T, F, F]])
    mixed = bm.group_advantages(r, think, grouping="mixed")
    per_mode = bm.group_advantages(r, think, grouping="per_mode")
    assert torch.allclose(mixed.values, torch.tensor([[1.0, 1.0, -1.0, -1.0]]), atol=1e-5)
    assert torch.equal(per_mode.values, torch.zeros(1, 4))
    assert mixed.informative.tolist() == [True]
    assert per_mode.informative.tolist() == [False]


def test_per_mode_groups_normalise_each_mode_separately():
    # think {1, 0}: mean .5 std .5 -> +1, -1; no-think {0, 0}: constant -> 0, 0.
    # Mixed over {1,0,0,0} instead gives sqrt3, -1/sqrt3 x3 (see above).
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    think = torch.tensor([[T, T, F, F]])
    pm = bm.group_advantages(r, think, grouping="per_mode", eps=0.0)
    assert torch.allclose(pm.values, torch.tensor([[1.0, -1.0, 0.0, 0.0]]))
    assert pm.informative.tolist() == [True]      # informative if EITHER mode differs
    # interleaved layout (think flags need not be contiguous)
    pm2 = bm.group_advantages(torch.tensor([[0.0, 1.0, 1.0, 0.0]]), torch.tensor([[F, T, F, T]]),
                              grouping="per_mode", eps=0.0)
    # think = positions 1,3 -> {1, 0} -> +1, -1; no-think = positions 0,2 -> {0, 1} -> -1, +1
    assert torch.allclose(pm2.values, torch.tensor([[-1.0, 1.0, 1.0, -1.0]]))


def test_zero_variance_groups_are_flagged_and_have_zero_advantage():
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    think = torch.tensor([[T, T, F, F]] * 3)
    for grouping in ("mixed", "per_mode"):
        adv = bm.group_advantages(r, think, grouping=grouping)
        assert adv.informative.tolist() == [False, False, True]
        assert torch.equal(adv.values[:2], torch.zeros(2, 4))
        assert torch.isfinite(adv.values).all()


def test_dr_grpo_unscaled_advantage():
    # scale_by_std=False: A = r - mean = .75, -.25, -.25, -.25
    adv = bm.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), scale_by_std=False)
    assert torch.allclose(adv.values, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="per_mode"):
        bm.group_advantages(torch.zeros(1, 4), None, grouping="per_mode")
    with pytest.raises(ValueError, match="prompts, rollouts"):
        bm.group_advantages(torch.zeros(4))


# --- log-probs, entropy -----------------------------------------------------------------------
def test_token_logprobs_respect_temperature():
    # logits [0, ln 2]: T=1 -> p = [1/3, 2/3]; T=2 -> logits [0, ln2 / 2] -> p1 = sqrt2 / (1 + sqrt2)
    logits = torch.tensor([[[0.0, math.log(2.0)]]])
    tgt = torch.tensor([[1]])
    lp1, ent1 = bm.token_logprobs(logits, tgt, 1.0)
    lp2, _ = bm.token_logprobs(logits, tgt, 2.0)
    assert lp1.item() == pytest.approx(math.log(2 / 3), abs=1e-6)
    assert lp2.item() == pytest.approx(math.log(math.sqrt(2) / (1 + math.sqrt(2))), abs=1e-6)
    # entropy of [1/3, 2/3] = -(1/3 ln 1/3 + 2/3 ln 2/3) = 0.6365142
    assert ent1.item() == pytest.approx(0.6365142, abs=1e-6)
    _, ent_u = bm.token_logprobs(torch.zeros(1, 1, 4), torch.tensor([[0]]))
    assert ent_u.item() == pytest.approx(math.log(4), abs=1e-6)


def test_suppressed_tokens_leave_the_distribution():
    # logits [0, 0, 0, 0] with token 3 suppressed: p = 1/3 for the rest; entropy ln 3, finite
    lp, ent = bm.token_logprobs(torch.zeros(1, 1, 4), torch.tensor([[0]]), 1.0, suppress=(3,))
    assert lp.item() == pytest.approx(math.log(1 / 3), abs=1e-6)
    assert ent.item() == pytest.approx(math.log(3), abs=1e-6)
    lp3, _ = bm.token_logprobs(torch.zeros(1, 1, 4), torch.tensor([[3]]), 1.0, suppress=(3,))
    assert lp3.item() == float("-inf")


# --- PPO clip ---------------------------------------------------------------------------------
def test_ppo_clip_four_cases_and_clip_fraction():
    # ratios e^.5 = 1.6487 and e^-.5 = .6065, eps .2, A = +1 / -1:
    #   rho 1.6487, A +1: min(1.6487, 1.2)   = 1.2     -> loss -1.2    clipped
    #   rho 0.6065, A +1: min(.6065, .8)     = .6065   -> loss -.6065  not clipped
    #   rho 0.6065, A -1: min(-.6065, -.8)   = -.8     -> loss .8      clipped
    #   rho 1.6487, A -1: min(-1.6487, -1.2) = -1.6487 -> loss 1.6487  not clipped
    logp = torch.tensor([[0.5, -0.5], [-0.5, 0.5]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    terms = bm.ppo_clip_loss(logp, old, adv, 0.2)
    expect = torch.tensor([[-1.2, -math.exp(-0.5)], [0.8, math.exp(0.5)]])
    assert torch.allclose(terms.loss, expect, atol=1e-5)
    assert terms.clipped.tolist() == [[True, False], [True, False]]
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert bm.masked_stats(terms.clipped.float(), mask)["mean"] == 0.5
    # no gradient flows through the clipped branch; elsewhere d(-rho A)/dlogp = -rho A
    terms.loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -math.exp(-0.5)], [0.0, math.exp(0.5)]]), atol=1e-5)


def test_ppo_clip_at_ratio_one_is_policy_gradient():
    # on-policy first step: rho = 1, loss = -A, d loss / d logp = -A (REINFORCE with baseline)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    terms = bm.ppo_clip_loss(logp, logp.detach(), torch.tensor([0.7]), 0.2)
    assert torch.allclose(terms.loss, torch.tensor([[-0.7, -0.7]]))
    assert not terms.clipped.any()
    terms.loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.7, -0.7]]))


def test_truncated_is_weights_by_hand():
    # proximal - behaviour = ln 1.5, ln 3, -ln 2 -> ratios 1.5, 3, 0.5; cap 2 truncates the 3 only
    prox = torch.tensor([[math.log(1.5), math.log(3.0), -math.log(2.0)]], requires_grad=True)
    weights, truncated = bm.truncated_is_weights(prox, torch.zeros(1, 3), cap=2.0)
    assert torch.allclose(weights, torch.tensor([[1.5, 2.0, 0.5]]))
    assert truncated.tolist() == [[False, True, False]]
    assert not weights.requires_grad          # a weight, never a path for the gradient
    # weighted PPO-clip term at rho = 1 (the trainer's first epoch): -w A per token
    terms = bm.ppo_clip_loss(prox, prox.detach(), torch.tensor([1.0]), 0.2)
    assert torch.allclose(weights * terms.loss, torch.tensor([[-1.5, -2.0, -0.5]]))


# --- KL ---------------------------------------------------------------------------------------
def test_k3_kl_values():
    # logp = ln .5, ref = ln .25: q = ln .5 -> e^q - q - 1 = .5 + .693147 - 1 = .193147
    kl = bm.k3_kl(torch.tensor([math.log(0.5), -1.0]), torch.tensor([math.log(0.25), -1.0]))
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert kl[1].item() == 0.0
    x = torch.randn(1000)
    assert (bm.k3_kl(x, torch.randn(1000)) >= 0).all()


def test_k3_kl_is_unbiased_estimate_of_kl():
    # sample from p, average k3 -> KL(p || q) for two categoricals
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = bm.k3_kl(p.log()[idx], q.log()[idx]).mean().item()
    exact = (p * (p / q).log()).sum().item()
    assert est == pytest.approx(exact, abs=5e-3)


# --- aggregation ------------------------------------------------------------------------------
def test_token_mean_vs_seq_mean():
    vals = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # token_mean: (1+2+3+4) / 4 = 2.5 ; seq_mean: ((1+2+3)/3 + 4/1) / 2 = (2 + 4) / 2 = 3
    assert bm.aggregate(vals, mask, "token_mean").item() == pytest.approx(2.5)
    assert bm.aggregate(vals, mask, "seq_mean").item() == pytest.approx(3.0)


def test_micro_batches_sum_to_full_batch_loss():
    vals = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [5.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    for how in ("token_mean", "seq_mean"):
        full = bm.aggregate(vals, mask, how)
        parts = sum(bm.aggregate(vals[i:i + 1], mask[i:i + 1], how, total_tokens=6, total_seqs=3)
                    for i in range(3))
        assert parts.item() == pytest.approx(full.item())


def test_sequence_without_tokens_counts_for_nothing():
    vals = torch.tensor([[2.0, 2.0], [7.0, 7.0]])
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    assert bm.aggregate(vals, mask, "seq_mean").item() == pytest.approx(2.0)
    assert bm.aggregate(vals, mask, "token_mean").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="aggregation"):
        bm.aggregate(vals, mask, "sum")


# --- masks ------------------------------------------------------------------------------------
def test_response_masks_trainable_and_prompt_only():
    # sequence [p p p | f f | g g g | pad]: forced tokens at 3,4 predicted at t=2,3;
    # generated 5,6,7 at t=4,5,6; t indexes the [length-1] next-token positions.
    args = (torch.tensor([3]), torch.tensor([2]), torch.tensor([3]), 9)
    loss_on, forced, gen = bm.response_masks(*args, forced_trainable=True)
    loss_off, _, _ = bm.response_masks(*args, forced_trainable=False)
    assert forced[0].nonzero().flatten().tolist() == [2, 3]
    assert gen[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert loss_on[0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert loss_off[0].nonzero().flatten().tolist() == [4, 5, 6]


def test_forced_token_gradient_only_when_trainable():
    """A two-way decision after `<think>` (index 0 = "\\n" think, 1 = "\\n\\n" no-think), learned by
    one logit vector. Think rollouts won (reward 1), no-think lost: with the forced token
    trainable, one mixed-advantage step raises p(think); as prompt, the decision gets no gradient."""
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    think = torch.tensor([[T, T, F, F]])
    adv = bm.group_advantages(rewards, think).values.flatten()          # +1 +1 -1 -1
    decision = torch.tensor([0, 0, 1, 1])                               # forced token per rollout
    for trainable, should_move in ((True, True), (False, False)):
        logits = torch.zeros(2, requires_grad=True)
        opt = torch.optim.SGD([logits], lr=0.5)
        # one response position per rollout (the forced decision token) + one generated token
        # that is identical in all rollouts (so its gradients cancel: sum of advantages is 0)
        step_logits = torch.stack([logits, torch.zeros(2)]).unsqueeze(0).expand(4, 2, 2)
        tgt = torch.stack([decision, torch.zeros(4, dtype=torch.long)], dim=1)
        logp, _ = bm.token_logprobs(step_logits, tgt)
        mask = torch.tensor([[trainable, True]] * 4)
        terms = bm.ppo_clip_loss(logp, logp.detach(), adv, 0.2)
        loss = bm.aggregate(terms.loss, mask, "token_mean")
        loss.backward()
        before = torch.softmax(logits.detach(), 0)[0].item()
        opt.step()
        after = torch.softmax(logits.detach(), 0)[0].item()
        if should_move:
            assert after > before + 0.05
        else:
            assert logits.grad is None or torch.count_nonzero(logits.grad) == 0
            assert after == before


def test_masked_stats_empty_and_values():
    x = torch.tensor([1.0, 3.0, 100.0])
    s = bm.masked_stats(x, torch.tensor([True, True, False]))
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert bm.masked_stats(x, torch.zeros(3, dtype=torch.bool))["mean"] == 0.0
