"""Noising: blocks, masking rates, complementary copies, which positions may be masked."""

import pytest
import torch

from dvlm.config import ConfigError, DiffusionConfig
from dvlm.data.processor import IGNORE_INDEX
from dvlm.diffusion.noising import NoiseWindow, build_noisy_stream, noise_extent
from dvlm.diffusion.schedule import annealed_block_size, sample_block_t

MASK = 99


def _batch():
    # [sys sys img img q q | r r r r r | q q | r r r], right-padded with 2 pads.
    ids = torch.tensor([[1, 2, 50, 50, 3, 4, 10, 11, 12, 13, 14, 5, 6, 20, 21, 22, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:11] = ids[0, 6:11]
    labels[0, 13:16] = ids[0, 13:16]
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 16:] = False
    mm = torch.zeros_like(ids)
    mm[0, 2:4] = 1
    return ids, labels, mask, mm


def _cfg(**kw):
    return DiffusionConfig.from_preset(kw.pop("preset", "fast-dvlm"), mask_token_id=MASK, **kw)


def _stream(cfg, block_size=2, seed=0):
    ids, labels, mask, mm = _batch()
    return build_noisy_stream(ids, labels, mask, mm, cfg, block_size, torch.Generator().manual_seed(seed))


def test_response_stream_holds_only_response_tokens_and_copies_are_complementary():
    stream, clean_block = _stream(_cfg())
    valid_src = stream.source[stream.valid]
    resp = [6, 7, 8, 9, 10, 13, 14, 15]
    assert valid_src.tolist() == resp + resp  # two copies, in order
    ids = _batch()[0]
    assert torch.equal(stream.xt[stream.valid & ~stream.masked], ids[0, stream.source[stream.valid & ~stream.masked]])
    assert (stream.xt[stream.masked] == MASK).all()
    n = len(resp)
    m1, m2 = stream.masked[0, :n], stream.masked[0, n:]
    # Block starts (token shift) are never masked; every other response token exactly once.
    starts = torch.tensor([6, 8, 10, 13, 15])
    first = torch.isin(torch.tensor(resp), starts)
    assert not (m1 | m2)[first].any()
    assert ((m1 ^ m2) == ~first).all()
    assert clean_block[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 7, 7]


def test_fill_last_block_completes_truncated_blocks_with_the_final_token():
    stream, clean_block = _stream(_cfg(fill_last_block=True), block_size=4)
    n = stream.valid.sum() // 2
    assert stream.source[0, :n].tolist() == [6, 7, 8, 9, 10, 10, 10, 10, 13, 14, 15, 15]
    assert stream.index[0, :n].tolist() == [6, 7, 8, 9, 10, 11, 12, 13, 13, 14, 15, 16]
    assert torch.equal(stream.source[0, n:2 * n], stream.source[0, :n])  # the second copy
    assert torch.equal(stream.block[0, :n], clean_block[0, stream.source[0, :n]])
    ids = _batch()[0]
    shown = stream.valid & ~stream.masked
    assert torch.equal(stream.xt[shown], ids[0, stream.source[shown]])  # unmasked fill tokens are the EOS copy
    fill = (stream.index != stream.source)[0, :n]
    assert fill.sum() == 4
    assert (stream.masked[0, :n][fill] ^ stream.masked[0, n:2 * n][fill]).all()  # each fill token masked once


def test_untruncated_last_block_continues_over_the_following_tokens():
    stream, clean_block = _stream(_cfg(truncate_last_block=False), block_size=4)
    n = stream.valid.sum() // 2
    # Response 1 (6-10) ends one token into its second block: the block takes in 11, 12, 13 (the next
    # prompt and the next answer's first token). Response 2 (13-15) ends the row: nothing follows.
    assert stream.source[0, :n].tolist() == [6, 7, 8, 9, 10, 11, 12, 13, 13, 14, 15]
    assert torch.equal(stream.index[0, :n], stream.source[0, :n])
    assert torch.equal(stream.source[0, n:2 * n], stream.source[0, :n])  # the second copy
    spilled = torch.tensor([False] * 5 + [True] * 3 + [False] * 3)
    assert (stream.block[0, :n][spilled] == clean_block[0, 10]).all()  # they join response 1's last block
    assert (stream.t[0, :n][spilled] == stream.t[0, 4]).all()
    assert torch.equal(stream.block[0, :n][~spilled], clean_block[0, stream.source[0, :n][~spilled]])
    assert not stream.masked[0, :2 * n][torch.cat([spilled, spilled])].any()  # shown, never scored
    assert stream.xt[0, :n][spilled].tolist() == [5, 6, 20]


@pytest.mark.parametrize("overrides", [{"fill_last_block": True}, {"noisy_stream": "text"},
                                       {"preset": "diffusionvl"}])
def test_untruncated_last_block_needs_a_response_only_layout_without_fill(overrides):
    with pytest.raises(ConfigError, match="truncate_last_block"):
        _cfg(truncate_last_block=False, **overrides)


def test_fill_last_block_needs_the_response_layout():
    with pytest.raises(ConfigError, match="fill_last_block"):
        _cfg(preset="diffusionvl", fill_last_block=True)


def test_copies_have_distinct_groups_but_same_blocks():
    stream, _ = _stream(_cfg())
    n = 8
    assert torch.equal(stream.block[0, :n], stream.block[0, n:])
    assert not set(stream.group[0, :n].tolist()) & set(stream.group[0, n:].tolist())


def test_without_token_shift_first_tokens_may_be_masked():
    cfg = _cfg(token_shift=False, ar_loss_weight=0.0, diffusion_loss_weight=1.0)
    stream, _ = _stream(cfg)
    n = 8
    assert ((stream.masked[0, :n] ^ stream.masked[0, n:2 * n])).all()  # every response token once


@pytest.mark.parametrize("mode,expected", [("text", 16), ("all", 16)])
def test_noisy_stream_modes(mode, expected):
    cfg = _cfg(noisy_stream=mode, complementary_mask=False)
    stream, _ = _stream(cfg)
    sources = stream.source[stream.valid].tolist()
    if mode == "text":
        assert 2 not in sources and 3 not in sources and len(sources) == 14
    else:
        assert sources == list(range(16))
    # Only response tokens are ever masked.
    assert set(stream.source[stream.masked].tolist()) <= {6, 7, 8, 9, 10, 13, 14, 15}


def test_diffusionvl_absolute_blocks_keep_vision_and_prompt_in_the_stream():
    cfg = _cfg(preset="diffusionvl")
    stream, clean_block = _stream(cfg, block_size=4)
    assert clean_block[0].tolist() == [i // 4 for i in range(18)]
    assert stream.source[stream.valid].tolist() == list(range(16))
    assert torch.equal(stream.group, torch.where(stream.valid, stream.block, -1))


def test_masking_rate_follows_t():
    # With eps_min close to eps_max, t is fixed and the mask fraction must follow it.
    ids = torch.arange(4000)[None] % 90
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX
    mask = torch.ones_like(ids, dtype=torch.bool)
    cfg = _cfg(eps_min=0.299, eps_max=0.3, complementary_mask=False, token_shift=False,
               ar_loss_weight=0.0, diffusion_loss_weight=1.0)
    stream, _ = build_noisy_stream(ids, labels, mask, torch.zeros_like(ids), cfg, 16, torch.Generator().manual_seed(0))
    frac = stream.masked.sum().item() / (4000 - 10)
    assert abs(frac - 0.3) < 0.03


def test_antithetic_t_covers_every_stratum_once():
    t = sample_block_t((4, 8), 0.0 + 1e-9, 1.0, True, torch.Generator().manual_seed(0))
    strata = torch.sort((t.flatten() * 32).floor()).values
    assert strata.tolist() == list(range(32))
    u = sample_block_t((4, 8), 1e-3, 1.0, False, torch.Generator().manual_seed(0))
    assert ((u >= 1e-3) & (u <= 1.0)).all()


def test_noise_is_reproducible_from_the_generator():
    a, _ = _stream(_cfg(), seed=3)
    b, _ = _stream(_cfg(), seed=3)
    c, _ = _stream(_cfg(), seed=4)
    assert torch.equal(a.masked, b.masked)
    assert not all(torch.equal(_stream(_cfg(), seed=s)[0].masked, c.masked) for s in range(5, 9))


def test_annealed_block_size_schedule():
    assert [annealed_block_size(p, 16, 0.5) for p in (0.0, 0.13, 0.26, 0.4, 0.5, 0.99)] == [2, 4, 8, 16, 16, 16]
    assert annealed_block_size(0.0, 16, 0.0) == 16
    assert annealed_block_size(0.0, 1, 0.5) == 1


def test_annealing_stages_start_exactly_at_their_step():
    """Worked by hand from the recipe (equal shares of the first anneal_fraction, one per size).

    10 steps, B=16, anneal_fraction 0.4: 4 annealed steps, one per size 2, 4, 8, 16 (in floats
    step 3 is 0.3 / 0.4 * 4 = 2.9999999999999996 stages in and would train at 8).
    7 steps, B=12, anneal_fraction 1: sizes 2, 4, 8, 12 (12 is not a power of two), 7/4 = 1.75
    steps each: stages start at 0, 1.75, 3.5, 5.25, so steps 0-1, 2-3, 4-5, 6.
    B=3: sizes 2, 3; B=2: 2 alone."""
    assert [annealed_block_size(s / 10, 16, 0.4) for s in range(10)] == [2, 4, 8, 16, 16, 16, 16, 16, 16, 16]
    assert [annealed_block_size(s / 7, 12, 1.0) for s in range(7)] == [2, 2, 4, 4, 8, 8, 12]
    assert [annealed_block_size(s / 4, 3, 1.0) for s in range(4)] == [2, 2, 3, 3]
    assert [annealed_block_size(s / 4, 2, 1.0) for s in range(4)] == [2, 2, 2, 2]
    # a long run: 300 annealed steps of 1000 (0.3), 75 per stage: steps 75, 150, 225 start the next
    sizes = [annealed_block_size(s / 1000, 16, 0.3) for s in (74, 75, 149, 150, 224, 225, 299, 300)]
    assert sizes == [2, 4, 4, 8, 8, 16, 16, 16]


def test_antithetic_sequence_order_literal():
    """DiffusionVL's assignment: stratum j to flat block j of (row, block), u = u_j / N + j / N,
    so t rises along each sequence and from one row to the next."""
    eps_min, eps_max = 1e-3, 1.0
    t = sample_block_t((2, 3), eps_min, eps_max, True, torch.Generator().manual_seed(0), order="sequence")
    u = torch.rand(6, generator=torch.Generator().manual_seed(0))
    expected = eps_min + (eps_max - eps_min) * (u / 6 + torch.arange(6) / 6)
    assert torch.equal(t.flatten(), expected)
    assert ((t.flatten() - eps_min) / (eps_max - eps_min) * 6).floor().tolist() == [0, 1, 2, 3, 4, 5]
    permuted = sample_block_t((2, 3), eps_min, eps_max, True, torch.Generator().manual_seed(0))
    assert sorted(((permuted.flatten() - eps_min) / (eps_max - eps_min) * 6).floor().tolist()) == [0, 1, 2, 3, 4, 5]
    assert not torch.equal(permuted, t)  # seed 0 permutes the strata
    with pytest.raises(ValueError, match="order"):
        sample_block_t((1, 2), eps_min, eps_max, True, order="sorted")


def test_diffusionvl_preset_masking_rate_rises_along_the_sequence():
    cfg = _cfg(preset="diffusionvl")
    assert cfg.antithetic_order == "sequence" and _cfg().antithetic_order == "permuted"
    stream, clean_block = _stream(cfg, block_size=4)
    blocks = stream.block[stream.valid].unique().tolist()
    t_by_block = [stream.t[stream.valid & (stream.block == b)].unique().item() for b in blocks]
    assert len(blocks) == 4 and t_by_block == sorted(t_by_block)


# -- windows: a batch split across processes keeps its noise ----------------------------------------


def _rows(lengths):
    """Right-padded rows: 3 prompt tokens, then `n` response tokens each."""
    width = 3 + max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, :3 + n] = torch.arange(1, 4 + n)
        labels[row, 3:3 + n] = ids[row, 3:3 + n]
        mask[row, :3 + n] = True
    return ids, labels, mask, torch.zeros_like(ids)


def _row_noise(stream, row):
    """(source, masked, t) of a row's valid noisy tokens: what its noise decided."""
    valid = stream.valid[row]
    return stream.source[row][valid].tolist(), stream.masked[row][valid].tolist(), stream.t[row][valid].tolist()


@pytest.mark.parametrize("changes", [{}, {"preset": "diffusionvl"}, {"fill_last_block": True}])
def test_a_batch_split_into_windows_draws_the_noise_of_the_whole_batch(changes):
    cfg, lengths = _cfg(**changes), [5, 9, 2, 7]
    whole, _ = build_noisy_stream(*_rows(lengths), cfg, 4, torch.Generator().manual_seed(3))
    rows, length, blocks = noise_extent(_rows(lengths)[1], _rows(lengths)[2], cfg, 4)
    for offset, part in ((0, lengths[:2]), (2, lengths[2:])):  # two processes, each padded to its own rows
        window = NoiseWindow(offset, rows, length, blocks)
        split, _ = build_noisy_stream(*_rows(part), cfg, 4, torch.Generator().manual_seed(3), window)
        for row in range(len(part)):
            assert _row_noise(split, row) == _row_noise(whole, offset + row)


def test_a_window_too_small_for_its_batch_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        build_noisy_stream(*_rows([5, 9]), _cfg(), 4, torch.Generator(), NoiseWindow(1, 2, 20, 8))
