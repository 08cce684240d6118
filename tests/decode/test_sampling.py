"""The unmasking policy and token selection, literally: fixed-step counts, tie order, thresholds,
banned tokens, the confidence a sampled token reports."""

import pytest
import torch

from dvlm.config import DiffusionConfig, Sampling
from dvlm.decode.block import fixed_steps_choice
from dvlm.decode.sampling import (
    RowSampler,
    block_schedule_count,
    greedy_tokens,
    sampling_distribution,
    steps_schedule_count,
    unmask_by_count,
    unmask_by_threshold,
    unmask_by_topk,
)

NEG = float("-inf")


def test_block_schedule_counts_literal():
    assert [block_schedule_count(8, 8, s) for s in range(8)] == [1] * 8
    assert [block_schedule_count(8, 4, s) for s in range(4)] == [2, 2, 2, 2]
    assert [block_schedule_count(8, 3, s) for s in range(3)] == [3, 3, 2]
    assert [block_schedule_count(8, 5, s) for s in range(5)] == [2, 2, 2, 1, 1]
    assert [block_schedule_count(4, 8, s) for s in range(8)] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert block_schedule_count(8, 3, 3) == 2 and block_schedule_count(4, 8, 9) == 1  # past the last step
    assert block_schedule_count(4, 8, 7) == 0 and block_schedule_count(4, 8, 8) == 1  # the first pass past it


def _per_pass_counts(preset: str, masked: torch.Tensor, steps: int, block_size: int) -> list[int]:
    """Run the fixed-step policy on a block until no mask is left; tokens unmasked per pass."""
    dcfg = DiffusionConfig.from_preset(preset)
    conf = torch.linspace(0.9, 0.2, masked.shape[1])[None]  # distinct confidences
    counts, step = [], 0
    while masked.any():
        chosen = fixed_steps_choice(conf, masked, masked, step, steps, block_size, dcfg)
        counts.append(int(chosen.sum()))
        masked = masked & ~chosen
        step += 1
    return counts


def test_partial_block_counts_follow_the_block_size_in_the_diffusionvl_preset():
    """A first block holding a 5-token prompt tail: 3 masks in a block of 8, 4 steps."""
    masked = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert _per_pass_counts("diffusionvl", masked, steps=4, block_size=8) == [2, 1]
    assert _per_pass_counts("fast-dvlm", masked, steps=4, block_size=8) == [1, 1, 1]
    full = torch.ones(1, 8, dtype=torch.bool)  # a whole block: both rules agree
    for steps in (3, 5, 8):
        assert _per_pass_counts("diffusionvl", full, steps, 8) == _per_pass_counts("fast-dvlm", full, steps, 8)


def test_ties_keep_torch_topk_order_in_the_diffusionvl_preset():
    """Exact ties among 8 masked positions: torch.topk (CPU, torch 2.13) takes positions 5 and 6
    for k=2, and 4, 5, 6, 7, 2 for k=5; dvlm's own rule takes the lowest indices."""
    conf = torch.full((1, 8), 0.5)
    masked = torch.ones(1, 8, dtype=torch.bool)
    two, five = torch.tensor([2]), torch.tensor([5])
    assert unmask_by_topk(conf, masked, two).nonzero()[:, 1].tolist() == [5, 6]
    assert unmask_by_topk(conf, masked, five).nonzero()[:, 1].tolist() == [2, 4, 5, 6, 7]
    assert unmask_by_count(conf, masked, two).nonzero()[:, 1].tolist() == [0, 1]
    # A prompt tail at -inf (not masked) and ties among the masks left.
    conf = torch.tensor([[NEG, 0.5, 0.2, 0.5, NEG, 0.5, 0.5, 0.1]])
    masked = conf > 0
    assert unmask_by_topk(conf, masked, two).nonzero()[:, 1].tolist() == [3, 5]
    assert unmask_by_count(conf, masked, two).nonzero()[:, 1].tolist() == [1, 3]


@pytest.mark.parametrize("preset,expected", [("diffusionvl", [5, 6]), ("fast-dvlm", [0, 1])])
def test_fixed_steps_tie_order_follows_the_preset(preset, expected):
    """A full block of 8 equally confident masks, 4 steps: the first pass takes 2."""
    conf, masked = torch.full((1, 8), 0.5), torch.ones(1, 8, dtype=torch.bool)
    chosen = fixed_steps_choice(conf, masked, masked, 0, 4, 8, DiffusionConfig.from_preset(preset))
    assert chosen.nonzero()[:, 1].tolist() == expected


def test_topk_rule_equals_one_topk_call_per_row():
    """What DiffusionVL does: for each row, topk(row confidences with -inf off the masks,
    min(count, masks)). Rows with different counts must not share one topk call."""
    gen = torch.Generator().manual_seed(0)
    conf = torch.randint(0, 3, (64, 8), generator=gen).float() / 4  # many exact ties
    masked = torch.rand(64, 8, generator=gen) < 0.7
    count = torch.randint(1, 5, (64,), generator=gen)
    chosen = unmask_by_topk(conf, masked, count)
    for r in range(64):
        row = conf[r].masked_fill(~masked[r], NEG)
        k = min(int(count[r]), int(masked[r].sum()))
        expected = torch.zeros(8, dtype=torch.bool)
        if k:
            expected[torch.topk(row, k).indices] = True
        assert torch.equal(chosen[r], expected), r


def test_steps_schedule_spreads_the_masks_left():
    masked = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8], dtype=torch.bool)
    assert steps_schedule_count(masked, 4).tolist() == [1, 2]
    assert steps_schedule_count(masked, 1).tolist() == [3, 8]


@pytest.mark.parametrize("threshold,expected", [(0.9, [[0, 1, 0, 1, 0]]), (0.95, [[0, 1, 0, 0, 0]]),
                                                (1.0, [[0, 1, 0, 0, 0]]), (0.0, [[0, 1, 1, 1, 1]])])
def test_threshold_rule_literal(threshold, expected):
    """conf >= threshold on masked positions, and always the most confident mask."""
    conf = torch.tensor([[0.99, 0.95, 0.5, 0.9, 0.3]])
    masked = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)
    assert unmask_by_threshold(conf, masked, threshold).int().tolist() == expected


# -- token selection: what is chosen, and the confidence reported for it -----------------------------

# One position's logits, log(1), log(2), log(5): probabilities 1/8, 2/8, 5/8 (cdf 0.125, 0.375, 1).
LOGITS = torch.tensor([1.0, 2.0, 5.0]).log()


def close(conf: torch.Tensor, expected: list) -> bool:
    return torch.allclose(conf, torch.tensor(expected), rtol=1e-6, atol=0)


class FixedDraws(RowSampler):
    """A RowSampler whose sampling rows draw the uniforms given, not from a random stream."""

    def __init__(self, samplings: list[Sampling], draws: list[list[float]], banned: list[int]):
        super().__init__(samplings, [None] * len(samplings), banned)
        self.draws = torch.tensor(draws)

    def uniforms(self, rows, count, device):
        return torch.where(torch.tensor(rows)[:, None], self.draws[:, :count], 0.0)


def test_greedy_selection_never_outputs_a_banned_token():
    """Banning [MASK] (id 2 here, the most likely): the choice is the best allowed token, and its
    confidence is its probability among the allowed ones, 2 / (1 + 2)."""
    tokens, conf = greedy_tokens(LOGITS[None], banned=[2])
    assert tokens.tolist() == [1] and conf.tolist() == pytest.approx([2 / 3], rel=1e-6)
    tokens, conf = greedy_tokens(LOGITS[None])
    assert tokens.tolist() == [2] and conf.tolist() == pytest.approx([5 / 8], rel=1e-6)
    greedy_rows = RowSampler([Sampling()], [None], banned=[2])
    tokens, conf = greedy_rows.select(LOGITS.expand(1, 2, 3))
    assert tokens.tolist() == [[1, 1]] and close(conf, [[2 / 3, 2 / 3]])


def test_a_sampled_token_reports_its_own_probability():
    """Row 0 greedy: token 2 at 5/8. Row 1 samples at temperature 1 with uniforms 0.05 and 0.2:
    tokens 0 (cdf 0.125 > 0.05) and 1 (0.125 <= 0.2 < 0.375), confidences 1/8 and 2/8, not the
    greedy token's 5/8. Row 2, top_k=2: probabilities 0, 2/7, 5/7, uniform 0.2 -> token 1 at 2/7."""
    sampler = FixedDraws([Sampling(), Sampling(temperature=1.0), Sampling(temperature=1.0, top_k=2)],
                         [[0.0, 0.0], [0.05, 0.2], [0.2, 0.9]], banned=[])
    tokens, conf = sampler.select(LOGITS.expand(3, 2, 3))
    assert tokens.tolist() == [[2, 2], [0, 1], [1, 2]]
    assert close(conf, [[5 / 8, 5 / 8], [1 / 8, 2 / 8], [2 / 7, 5 / 7]])
    # The threshold then unmasks on these confidences: at 0.5, row 1 unmasks its most confident
    # position only (2/8), row 2 the token at 5/7.
    chosen = unmask_by_threshold(conf, torch.ones(3, 2, dtype=torch.bool), 0.5)
    assert chosen.tolist() == [[True, True], [False, True], [False, True]]


def test_a_sampling_row_never_draws_a_banned_token():
    """[MASK] (id 2) banned: probabilities 1/3, 2/3, 0; a uniform of 0.99 draws token 1, at 2/3."""
    sampler = FixedDraws([Sampling(temperature=1.0)], [[0.99]], banned=[2])
    tokens, conf = sampler.select(LOGITS.expand(1, 1, 3))
    assert tokens.tolist() == [[1]] and close(conf, [[2 / 3]])


@pytest.mark.parametrize(("top_p", "kept"), [
    (0.5, [True, False, False, False]),  # 0.5 is reached by the first token alone
    (0.5000001, [True, True, False, False]),
    (0.875, [True, True, False, False]),  # 0.5 + 0.375 reaches it exactly
    (0.8750001, [True, True, True, False]),
    (1.0, [True, True, True, True]),
])
def test_top_p_keeps_the_smallest_set_that_reaches_p_as_transformers_does(top_p, kept):
    """Probabilities 0.5, 0.375, 0.125, 1e-9 (exact in binary): the nucleus is the most likely
    tokens up to the first whose cumulative probability reaches top_p, as transformers'
    TopPLogitsWarper keeps them."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.tensor([[0.5, 0.375, 0.125, 1e-9]]).log()
    ours = sampling_distribution(logits, [Sampling(temperature=1.0, top_p=top_p)])
    assert (ours > 0).tolist() == [kept]
    assert (TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")).tolist() == [kept]


def test_top_k_keeps_ties_with_the_kth_token_as_transformers_does():
    """Logits 3, 2, 2, 1 and top_k=2: the k-th largest logit is 2, and every token at least that
    likely stays (transformers' TopKLogitsWarper keeps the tie too); top_k=1 keeps the first."""
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    for k, kept in ((2, [True, True, True, False]), (1, [True, False, False, False]), (4, [True] * 4)):
        assert (sampling_distribution(logits, [Sampling(temperature=1.0, top_k=k)]) > 0).tolist() == [kept]
        assert (TopKLogitsWarper(k)(None, logits.clone()) > float("-inf")).tolist() == [kept]
