"""Invariant 7 for rows that join a running batch (the server's engine): a row that joins at block
boundary k produces exactly the tokens and forwards it produces decoded alone, and the rows
already running are unchanged; with seeded sampling too. The steppers are driven here as the
engine drives them: start, join, step, drop."""

import pytest

from dvlm.config import DecodeConfig, Sampling
from dvlm.convert.verify import probe_image
from dvlm.decode.ar import ARStepper
from dvlm.decode.block import BlockStepper
from dvlm.decode.settings import RowSettings
from dvlm.decode.speculative import SpecStepper
from dvlm.decode.stepper import run_to_completion
from dvlm.model.cache import KVContext, RecomputeContext

STEPPERS = {"ar": ARStepper, "block": BlockStepper, "spec": SpecStepper}
RUNNING = [("Read the digits.", 2), ("Describe the image. How many shapes are there?", 1)]
JOINING = ("What colour is the circle?", 1)

CASES = [
    ("ar", "fast-dvlm", {}),
    ("block", "fast-dvlm", dict(block_size=4, threshold=0.9)),
    ("block", "fast-dvlm", dict(block_size=4, steps=2)),
    ("block", "diffusionvl", dict(block_size=4, threshold=0.9)),
    ("block", "diffusionvl", dict(block_size=8, steps=4)),
    ("spec", "fast-dvlm", dict(block_size=4)),
]


def _encode(lm, text, n_images):
    return lm.encode(text, [probe_image(56 + 28 * i) for i in range(n_images)])


def _stats(out):
    return out.tokens, out.nfe, out.tokens_per_step, out.accept_lengths, out.finish_reason


def decode_alone(lm, decoder, cfg, prompt, row, context_cls=KVContext):
    group, _ = STEPPERS[decoder].settings_for(lm, cfg)
    return run_to_completion(STEPPERS[decoder](lm, group, context_cls), [prompt], row)[0]


def decode_with_join(lm, decoder, cfg, running, rows, joining, joining_rows, k, context_cls=KVContext):
    """`running` start together; after k steps `joining` join; everything runs to the end.
    Returns the outputs of the running rows, then of the joining ones."""
    group, _ = STEPPERS[decoder].settings_for(lm, cfg)
    stepper = STEPPERS[decoder](lm, group, context_cls)
    first = stepper.start(running, rows)
    stepper.join(first)
    for _ in range(k):
        stepper.step()
    assert stepper.num_active  # the join really happens into a running batch
    late = stepper.start(joining, joining_rows)
    stepper.join(late)
    while stepper.num_active:
        stepper.step()
    return [stepper.output(i, {}) for i in first.ids + late.ids]


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("decoder,preset,settings", CASES)
def test_a_row_joining_at_block_k_equals_the_row_alone(confident_models, decoder, preset, settings, k):
    lm = confident_models[preset]
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=14, **settings)
    _, row = STEPPERS[decoder].settings_for(lm, cfg)
    running = [_encode(lm, *p) for p in RUNNING]
    joining = [_encode(lm, *JOINING)]
    # The joining row has its own budget: fewer tokens than the running rows (and than B for block).
    short = RowSettings(3, threshold=row.threshold)
    together = decode_with_join(lm, decoder, cfg, running, [row, row], joining + running[:1], [short, row], k)
    prompts, rows = running + joining + running[:1], [row, row, short, row]
    alone = [decode_alone(lm, decoder, cfg, p, r) for p, r in zip(prompts, rows)]
    assert [_stats(o) for o in together] == [_stats(o) for o in alone]
    assert len(together[2].tokens) == 3 and len(together[0].tokens) > 3
    if decoder == "block" and settings.get("threshold"):
        assert max(n for o in together for n in o.tokens_per_step) >= 2  # thresholds really unmask several


@pytest.mark.parametrize("decoder,preset,settings", [CASES[1], CASES[4], CASES[5]])
def test_joined_decoding_cached_equals_recomputed(confident_models, decoder, preset, settings):
    """Invariant 4 through joins: the same schedule of joins without a cache."""
    lm = confident_models[preset]
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=10, **settings)
    _, row = STEPPERS[decoder].settings_for(lm, cfg)
    running, joining = [_encode(lm, *p) for p in RUNNING], [_encode(lm, *JOINING)]
    cached = decode_with_join(lm, decoder, cfg, running, [row, row], joining, [row], 1)
    recomputed = decode_with_join(lm, decoder, cfg, running, [row, row], joining, [row], 1, RecomputeContext)
    assert [_stats(o) for o in cached] == [_stats(o) for o in recomputed]


@pytest.mark.parametrize("decoder,preset,settings", [CASES[0], CASES[1], CASES[3], CASES[5]])
def test_seeded_sampling_does_not_depend_on_the_batch(confident_models, decoder, preset, settings):
    """Sampling rows (own seeds) next to a greedy row, one joining late, with budgets that give
    them blocks narrower than the batch's canvas: each row's tokens equal the row decoded alone
    with its seed; another seed gives another answer."""
    lm = confident_models[preset]
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=12, **settings)
    _, greedy = STEPPERS[decoder].settings_for(lm, cfg)
    hot = [RowSettings(n, Sampling(temperature=1.5, seed=s), threshold=greedy.threshold) for n, s in ((7, 3), (3, 4))]
    running, joining = [_encode(lm, *p) for p in RUNNING], [_encode(lm, *JOINING)]
    together = decode_with_join(lm, decoder, cfg, running, [hot[0], greedy], joining, [hot[1]], 1)
    alone = [decode_alone(lm, decoder, cfg, p, r) for p, r in zip(running + joining, [hot[0], greedy, hot[1]])]
    assert [_stats(o) for o in together] == [_stats(o) for o in alone]
    reseeded = [decode_alone(lm, decoder, cfg, running[0], RowSettings(12, Sampling(1.5, seed=s), greedy.threshold)) for s in (3, 5)]
    assert reseeded[0].tokens != reseeded[1].tokens


def test_generate_gives_every_row_the_seed_of_the_config(confident_models):
    """generate(seed=s) seeds each row's own stream with s: a batch of one prompt twice samples one
    answer twice, the answer of the prompt alone."""
    lm = confident_models["fast-dvlm"]
    kw = dict(decoder="block", block_size=4, temperature=1.5, seed=11, max_new_tokens=10)
    image = [probe_image()]
    batch = lm.generate(["Read the digits.", "Hi", "Read the digits."], [image, [], image], **kw)
    assert batch[0].tokens == batch[2].tokens == lm.generate("Read the digits.", image, **kw).tokens


def test_joining_row_keeps_its_own_first_block_width(confident_models):
    """N2 with per-row budgets (response layout, B=4): running rows are at a full block, a row
    that joins with max_new_tokens=2 decodes a block of 2 positions (the padding after them is
    invalid, never masked), as it does alone."""
    lm = confident_models["fast-dvlm"]
    cfg = DecodeConfig(decoder="block", block_size=4, threshold=0.9, max_new_tokens=12)
    group, row = BlockStepper.settings_for(lm, cfg)
    stepper = BlockStepper(lm, group)
    stepper.join(stepper.start([_encode(lm, *RUNNING[0])], [row]))
    stepper.step()
    stepper.join(stepper.start([_encode(lm, *JOINING)], [RowSettings(2, threshold=0.9)]))
    canvas = stepper.state.canvas
    assert canvas.validity().int().tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert (canvas.ids[1, 2:] == lm.processor.pad_token_id).all()
    assert (canvas.ids[:, 1:2] == lm.mask_token_id).all()


def test_absolute_layout_joining_row_whose_answer_fits_in_its_first_block(confident_models):
    """DiffusionVL's rule per row: "Hi" (P = 9) with 3 new tokens fits in one block of 16 (12
    positions), next to a running row whose blocks are 16 wide."""
    lm = confident_models["diffusionvl"]
    cfg = DecodeConfig(decoder="block", block_size=16, steps=16, max_new_tokens=20)
    group, row = BlockStepper.settings_for(lm, cfg)
    stepper = BlockStepper(lm, group)
    first = stepper.start([_encode(lm, *RUNNING[0])], [row])
    stepper.join(first)
    stepper.step()
    hi = lm.encode("Hi")
    late = stepper.start([hi], [RowSettings(3)])
    stepper.join(late)
    assert stepper.state.canvas.validity().sum(dim=1).tolist() == [16, len(hi) + 3]
    while stepper.num_active:
        stepper.step()
    alone = decode_alone(lm, "block", cfg, hi, RowSettings(3))
    assert _stats(stepper.output(late.ids[0], {})) == _stats(alone)


@pytest.mark.parametrize("decoder,preset,settings", [CASES[0], CASES[1], CASES[5]])
def test_a_dropped_row_leaves_the_others_unchanged(confident_models, decoder, preset, settings):
    lm = confident_models[preset]
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=12, **settings)
    group, row = STEPPERS[decoder].settings_for(lm, cfg)
    prompts = [_encode(lm, *p) for p in RUNNING] + [_encode(lm, *JOINING)]
    stepper = STEPPERS[decoder](lm, group)
    started = stepper.start(prompts, [row] * 3)
    stepper.join(started)
    stepper.step()
    stepper.drop([started.ids[1]])
    assert stepper.num_active == 2
    while stepper.num_active:
        stepper.step()
    for i in (0, 2):
        assert _stats(stepper.output(started.ids[i], {})) == _stats(decode_alone(lm, decoder, cfg, prompts[i], row))


def test_per_row_thresholds_in_one_batch(confident_models):
    """Rows with different thresholds share a batch; each unmasks by its own."""
    lm = confident_models["fast-dvlm"]
    cfg = DecodeConfig(decoder="block", block_size=8, max_new_tokens=16)
    group, _ = BlockStepper.settings_for(lm, cfg)
    prompts = [_encode(lm, *RUNNING[0])] * 2
    rows = [RowSettings(16, threshold=0.99), RowSettings(16, threshold=0.5)]
    stepper = BlockStepper(lm, group)
    started = stepper.start(prompts, rows)
    stepper.join(started)
    while stepper.num_active:
        stepper.step()
    together = [stepper.output(i, {}) for i in started.ids]
    alone = [decode_alone(lm, "block", cfg, p, r) for p, r in zip(prompts, rows)]
    assert [_stats(o) for o in together] == [_stats(o) for o in alone]
    assert together[0].nfe > together[1].nfe  # the stricter threshold takes more passes


@pytest.mark.parametrize("decoder", ["ar", "spec"])
def test_the_first_token_streams_before_any_decoding_forward(confident_models, decoder):
    """The token the prefill picks is committed by the next step without a forward (it reaches a
    listener or a client then, not one forward later), also for a row joining a running batch; the
    rows running meanwhile commit nothing in that step; later steps commit the token their forward
    picked. The answers equal the rows decoded alone."""
    lm = confident_models["fast-dvlm"]
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=10, block_size=4)
    group, row = STEPPERS[decoder].settings_for(lm, cfg)
    running, joining = [_encode(lm, *RUNNING[0])], [_encode(lm, *JOINING)]
    stepper = STEPPERS[decoder](lm, group)
    first = stepper.start(running, [row])
    prefill_forwards = stepper.rows.forwards
    stepper.join(first)
    report = stepper.step()
    assert report.forwards == 0 and stepper.rows.forwards == prefill_forwards
    assert [(i, len(t)) for i, t in report.committed] == [(first.ids[0], 1)]
    report = stepper.step()
    assert report.forwards >= 1 and report.committed[0][0] == first.ids[0]
    late = stepper.start(joining, [row])
    stepper.join(late)
    report = stepper.step()
    assert report.forwards == 0 and [(i, len(t)) for i, t in report.committed] == [(late.ids[0], 1)]
    while stepper.num_active:
        assert stepper.step().forwards >= 1  # no more steps without a forward
    alone = [decode_alone(lm, decoder, cfg, p, row) for p in running + joining]
    assert [_stats(stepper.output(i, {})) for i in first.ids + late.ids] == [_stats(o) for o in alone]
    assert stepper.output(first.ids[0], {}).tokens[0] == alone[0].tokens[0]
