"""Tests for mlx_gemma.sampler: validation, logit processing, seeding, statistics."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma import sampler as sampler_module
from mlx_gemma.sampler import GenerationParams, RowSampler, process_logits, sample

INF = math.inf


def row(prompt_ids=(), vocab_size=6, **params) -> RowSampler:
    return RowSampler(GenerationParams(**params), list(prompt_ids), vocab_size)


def processed(logits, rows) -> np.ndarray:
    return np.array(process_logits(mx.array(logits, mx.float32), rows))


def kept_tokens(row_logits: np.ndarray) -> list[int]:
    return [i for i, value in enumerate(row_logits) if value > -INF]


def probs_logits(probs) -> list[float]:
    return [math.log(p) for p in probs]


def run_steps(rows, logits_per_step) -> np.ndarray:
    """Sample every step lazily, evaluate once at the end; (steps, B) tokens."""
    steps = [sample(logits, rows) for logits in logits_per_step]
    return np.array(mx.stack(steps))


def step_logits(steps: int, vocab_size: int, seed: int) -> list[mx.array]:
    key = mx.random.key(seed)
    return [mx.random.normal((vocab_size,), key=k) for k in mx.random.split(key, steps)]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("temperature", 9, "temperature=9 is out of range: use a number from 0 to 5 (0 means greedy)"),
        ("top_k", 0, "top_k=0 is out of range: use an integer from 1 to 50"),
        ("top_k", 51, "top_k=51 is out of range: use an integer from 1 to 50"),
        ("top_p", -0.1, "top_p=-0.1 is out of range: use a number from 0 to 2"),
        ("seed", 0, "seed=0 is out of range: use an integer from 1 to 9999999999"),
        ("repetition_penalty", 0, "repetition_penalty=0 is out of range: use a number greater than 0"),
        ("temperature", "hot", "temperature='hot' has type str: use a number from 0 to 5"),
        ("max_tokens", 0, "max_tokens=0 is out of range: use an integer >= 1"),
        ("top_k", True, "top_k=True has type bool: use an integer"),
        ("top_k", 5.5, "top_k=5.5 has type float: use an integer"),
        ("frequency_penalty", 2.5, "frequency_penalty=2.5 is out of range: use a number from 0 to 2"),
        ("presence_penalty", -1, "presence_penalty=-1 is out of range: use a number from 0 to 2"),
        ("temperature", float("nan"), "temperature=nan is out of range"),
    ],
)
def test_validate_rejects_with_named_value(field, value, expected):
    with pytest.raises(ValueError) as error:
        GenerationParams(**{field: value}).validate()
    assert expected in str(error.value)
    assert ";" not in str(error.value)


def test_validate_collects_all_problems_in_one_message():
    params = GenerationParams(temperature=9, top_k=0, seed=0, max_tokens=0)
    with pytest.raises(ValueError) as error:
        params.validate()
    parts = str(error.value).split("; ")
    assert len(parts) == 4
    for text in ("temperature=9", "top_k=0", "seed=0", "max_tokens=0"):
        assert sum(text in part for part in parts) == 1


def test_validate_accepts_the_limits_and_returns_self():
    edges = GenerationParams(
        max_tokens=1, temperature=5, top_p=2, top_k=50, seed=9999999999,
        repetition_penalty=2, frequency_penalty=0, presence_penalty=2,
    )
    assert edges.validate() is edges
    assert GenerationParams(temperature=0, top_p=0, top_k=1, seed=1).validate().top_p == 0
    assert GenerationParams().validate() == GenerationParams()


def test_row_sampler_validates_params():
    with pytest.raises(ValueError, match="temperature=-1"):
        row(temperature=-1)


# ---------------------------------------------------------------- greedy


def test_greedy_batch_is_argmax():
    logits = mx.random.normal((5, 40), key=mx.random.key(7))
    rows = [row(vocab_size=40, temperature=0) for _ in range(5)]
    tokens = sample(logits, rows)
    assert tokens.dtype == mx.int32 and tokens.shape == (5,)
    assert np.array(tokens).tolist() == np.argmax(np.array(logits), axis=-1).tolist()


def test_greedy_ignores_seed_and_filters():
    logits = step_logits(10, 30, seed=3)
    tokens_by_seed = [
        run_steps([row(vocab_size=30, temperature=0, seed=seed, top_k=5, top_p=0.3)],
                  [x[None] for x in logits])
        for seed in (1, 2, 12345)
    ]
    expected = [int(np.argmax(np.array(x))) for x in logits]
    for tokens in tokens_by_seed:
        assert tokens[:, 0].tolist() == expected


def test_greedy_with_penalty_is_argmax_of_penalized_logits():
    greedy = row(temperature=0, presence_penalty=2.0)
    logits = mx.array([[0.0, 3.0, 2.5, 1.8, 0.0, 0.0]])
    tokens = run_steps([greedy], [logits] * 3)[:, 0].tolist()
    assert tokens == [1, 2, 3]  # each pick loses 2 once it is present


# ---------------------------------------------------------------- penalties


BASE = [2.0, -1.0, 3.0, -2.0, 0.5, 1.0]


def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output():
    penalized = row(prompt_ids=[0, 1], temperature=0, repetition_penalty=2.0)
    penalized.record(mx.array(3, mx.int32))
    out = processed([BASE], [penalized])[0]
    np.testing.assert_allclose(out, [1.0, -2.0, 3.0, -4.0, 0.5, 1.0])


def test_frequency_penalty_counts_output_only():
    penalized = row(prompt_ids=[2, 2, 0], temperature=0, frequency_penalty=0.5)
    for token in (4, 4, 5):
        penalized.record(mx.array(token, mx.int32))
    out = processed([BASE], [penalized])[0]
    np.testing.assert_allclose(out, [2.0, -1.0, 3.0, -2.0, -0.5, 0.5])


def test_presence_penalty_applies_once_for_output_tokens():
    penalized = row(prompt_ids=[2], temperature=0, presence_penalty=0.3)
    for token in (4, 4, 5):
        penalized.record(mx.array(token, mx.int32))
    out = processed([BASE], [penalized])[0]
    np.testing.assert_allclose(out, [2.0, -1.0, 3.0, -2.0, 0.2, 0.7], rtol=1e-6)


def test_penalties_apply_in_order_repetition_then_frequency_then_presence():
    penalized = row(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    for token in (4, 4, 1):
        penalized.record(mx.array(token, mx.int32))
    out = processed([BASE], [penalized])[0]
    # token 4: 0.5/2 - 0.5*2 - 0.25; token 1: -1*2 - 0.5 - 0.25
    np.testing.assert_allclose(out, [2.0, -2.75, 3.0, -2.0, -1.0, 1.0])


def test_penalty_off_values_allocate_no_state():
    plain = row(temperature=0.7, repetition_penalty=1.0, frequency_penalty=0, presence_penalty=0.0)
    assert not plain.has_penalty and len(plain.state()) == 1
    assert len(row(frequency_penalty=0.1).state()) == 2
    assert len(row(repetition_penalty=1.2).state()) == 3


def test_penalties_update_lazily_across_steps(monkeypatch):
    def no_eval(*_args):
        raise AssertionError("sample must not evaluate")

    monkeypatch.setattr(sampler_module.mx, "eval", no_eval)
    monkeypatch.setattr(sampler_module.mx, "async_eval", no_eval)
    penalized = row(temperature=0, frequency_penalty=1.0)
    logits = mx.array([[0.0, 0.0, 5.0, 4.5, 0.0, 0.0]])
    first = sample(logits, [penalized])
    second = sample(logits, [penalized])
    after = process_logits(logits, [penalized])
    monkeypatch.undo()
    assert np.array(first).tolist() == [2]
    assert np.array(second).tolist() == [3]  # 5 - 1 < 4.5
    np.testing.assert_allclose(np.array(after)[0], [0.0, 0.0, 4.0, 3.5, 0.0, 0.0])


# ---------------------------------------------------------------- temperature and filters


def test_temperature_divides_logits():
    out = processed([BASE], [row(temperature=0.5)])[0]
    np.testing.assert_allclose(out, [4.0, -2.0, 6.0, -4.0, 1.0, 2.0])


def test_top_k_keeps_exactly_k():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0, 2.5]
    out = processed([logits] * 3, [row(temperature=1, top_k=k) for k in (1, 2, 4)])
    assert kept_tokens(out[0]) == [1]
    assert kept_tokens(out[1]) == [1, 5]
    assert kept_tokens(out[2]) == [0, 1, 2, 5]
    np.testing.assert_allclose(out[2][[0, 1, 2, 5]], [1.0, 3.0, 2.0, 2.5])


def test_tokens_tied_with_the_kth_are_kept_and_share_the_nucleus():
    """As vLLM: top_k keeps ties with the k-th logit, and top_p's probabilities count them, even past
    the candidate window (k=2 reads two candidates; the tied third still takes its share of the mass)."""
    logits = [3.0, 1.0, 1.0]
    only_k, with_p = processed([logits] * 2, [row(vocab_size=3, temperature=1, top_k=2),
                                              row(vocab_size=3, temperature=1, top_k=2, top_p=0.8)])
    assert kept_tokens(only_k) == [0, 1, 2]
    # probabilities 0.787, 0.107, 0.107: 0.8 is not reached by token 0 alone, so the tie at 1 is kept
    assert kept_tokens(with_p) == [0, 1, 2]


def test_a_tiny_temperature_counts_as_vllms_floor_and_never_overflows():
    logits = [1.0, 2.0, -1.0, 0.0]
    for temperature in (1e-3, 1e-40, 5e-324):
        np.testing.assert_allclose(processed([logits], [row(vocab_size=4, temperature=temperature)])[0],
                                   np.array(logits) / 0.01)
    rows = [row(vocab_size=4, temperature=5e-324, seed=seed, **extra) for seed in range(1, 11)
            for extra in ({}, {"top_k": 2}, {"top_p": 0.9})]
    assert np.array(sample(mx.array([logits] * len(rows)), rows)).tolist() == [1] * len(rows)


def test_gumbel_noise_of_minus_infinity_cannot_pick_a_filtered_token():
    """Seed 26479 draws u == 0 at token 228139 on its first step at Gemma's vocabulary size: the noise
    there would be -inf and the lone kept token would lose to token 0 (<pad>)."""
    vocab, only = 256000, 228139
    logits = mx.zeros((1, vocab))
    logits[0, only] = 30.0
    for params in ({"top_k": 1}, {"top_p": 0.9, "temperature": 0.7}):
        params = {"temperature": 1.0, **params}
        assert sample(logits, [row(vocab_size=vocab, seed=26479, **params)]).tolist() == [only]
    noise = sampler_module._batched_gumbel(vocab)(mx.stack([mx.random.key(26479)]))
    assert float(noise.min()) > -INF


def test_top_k_larger_than_vocab_keeps_all():
    out = processed([BASE], [row(temperature=1, top_k=50)])[0]
    np.testing.assert_allclose(out, BASE)


# softmax of these logits is exactly PROBS (up to rounding)
PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]
P_LOGITS = probs_logits(PROBS)


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.0, [1]),  # always keep the top token
        (0.35, [1]),  # 0.4 >= 0.35
        (0.65, [1, 3]),  # 0.4 < 0.65 <= 0.7
        (0.75, [1, 3, 4]),  # 0.7 < 0.75 <= 0.85
        (0.9, [1, 2, 3, 4]),  # 0.85 < 0.9 <= 0.95
        (0.97, [0, 1, 2, 3, 4]),
        (1.0, [0, 1, 2, 3, 4]),
        (2.0, [0, 1, 2, 3, 4]),
    ],
)
def test_top_p_keeps_smallest_nucleus(top_p, expected):
    out = processed([P_LOGITS], [row(vocab_size=5, temperature=1, top_p=top_p)])[0]
    assert kept_tokens(out) == expected
    np.testing.assert_allclose(out[expected], np.array(P_LOGITS)[expected], rtol=1e-6)


def test_top_p_applies_to_probabilities_after_temperature_and_top_k():
    # after top_k=3: 0.4, 0.3, 0.15 renormalized -> 0.47, 0.35, 0.18: 0.8 is reached at 2
    out = processed([P_LOGITS] * 2, [
        row(vocab_size=5, temperature=1, top_k=3, top_p=0.8),
        row(vocab_size=5, temperature=1, top_p=0.8),
    ])
    assert kept_tokens(out[0]) == [1, 3]
    assert kept_tokens(out[1]) == [1, 3, 4]
    # temperature 5 flattens to 0.24, 0.23, 0.20, 0.18, 0.16: 0.5 needs 3 tokens, not 2
    flat, sharp = processed([P_LOGITS] * 2, [
        row(vocab_size=5, temperature=5, top_p=0.5),
        row(vocab_size=5, temperature=1, top_p=0.5),
    ])
    assert kept_tokens(flat) == [1, 3, 4]
    assert kept_tokens(sharp) == [1, 3]


def test_mixed_batch_rows_are_processed_independently():
    logits = [BASE, list(reversed(BASE)), BASE, BASE]
    rows = [
        row(temperature=0.5, top_k=2),
        row(temperature=1, top_p=0.5),
        row(temperature=0, top_k=1, top_p=0.1),  # greedy: no filters
        row(temperature=2),
    ]
    out = processed(logits, rows)
    alone = [processed([x], [r])[0] for x, r in zip(logits, rows)]
    np.testing.assert_array_equal(out, np.stack(alone))
    assert kept_tokens(out[0]) == [0, 2]
    np.testing.assert_allclose(out[2], BASE)
    np.testing.assert_allclose(out[3], np.array(BASE) / 2)


def test_only_rows_with_top_p_alone_sort_the_whole_vocabulary(monkeypatch):
    """A batch where one row has top_p without top_k: that row alone is sorted over the whole
    vocabulary (a 256k-token sort per row is the dearest step of sampling), the top_k rows over
    their k best, and every row still gets what it would get alone."""
    sorted_shapes = []

    class RecordingMx:
        def __getattr__(self, name):
            return getattr(mx, name)

        @staticmethod
        def sort(a, *args, **kwargs):
            sorted_shapes.append(tuple(a.shape))
            return mx.sort(a, *args, **kwargs)

    vocab = 40
    logits = [[math.sin(3 * i + r) * (r + 1) for i in range(vocab)] for r in range(5)]
    rows = [row(vocab_size=vocab, temperature=0.5),
            row(vocab_size=vocab, temperature=1, top_p=0.6),
            row(vocab_size=vocab, temperature=0.7, top_k=3),
            row(vocab_size=vocab, temperature=0),
            row(vocab_size=vocab, temperature=1.3, top_k=5, top_p=0.8)]
    alone = [processed([x], [r])[0] for x, r in zip(logits, rows)]
    monkeypatch.setattr(sampler_module, "mx", RecordingMx())
    together = processed(logits, rows)
    np.testing.assert_array_equal(together, np.stack(alone))
    assert sorted(sorted_shapes) == [(1, vocab), (2, 5)]  # row 1 whole; rows 2 and 4 their widest k
    assert kept_tokens(together[1]) == kept_tokens(alone[1]) and 0 < len(kept_tokens(together[1])) < vocab


def test_logits_shape_must_match_rows():
    with pytest.raises(ValueError, match="does not match 2 rows"):
        process_logits(mx.zeros((3, 6)), [row(), row()])


# ---------------------------------------------------------------- seeding


STEPS, VOCAB = 20, 50


def seeded_tokens(params_row, logits, batch=None, position=0) -> list[int]:
    """Tokens of one row over STEPS, optionally inside a batch at ``position``."""
    others = batch or []
    rows = others[:position] + [params_row] + others[position:]
    per_step = []
    for step, x in enumerate(logits):
        other_logits = [mx.roll(x, 7 * (j + 1) + step) for j in range(len(others))]
        batch_logits = other_logits[:position] + [x] + other_logits[position:]
        per_step.append(mx.stack(batch_logits))
    return run_steps(rows, per_step)[:, position].tolist()


def test_same_seed_gives_same_sequence_and_different_seeds_differ():
    logits = [x * 0.3 for x in step_logits(STEPS, VOCAB, seed=11)]
    first = seeded_tokens(row(vocab_size=VOCAB, temperature=1, seed=42), logits)
    again = seeded_tokens(row(vocab_size=VOCAB, temperature=1, seed=42), logits)
    other = seeded_tokens(row(vocab_size=VOCAB, temperature=1, seed=43), logits)
    assert first == again
    assert first != other
    assert len(set(first)) > 5  # it really samples


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0, seed=42),
        dict(temperature=0.8, top_k=10, top_p=0.9, frequency_penalty=0.5, seed=7),
        dict(temperature=1.2, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.4, seed=99),
    ],
)
def test_seeded_row_is_independent_of_batch_and_position(params):
    logits = [x * 0.5 for x in step_logits(STEPS, VOCAB, seed=5)]

    def neighbours():
        return [
            row(vocab_size=VOCAB, temperature=0.7, top_p=0.5, seed=1),
            row(vocab_size=VOCAB, temperature=0, frequency_penalty=1.0),
            row(vocab_size=VOCAB, temperature=1.5, top_k=50, repetition_penalty=1.5),
        ]

    alone = seeded_tokens(row([1, 2, 3], VOCAB, **params), logits)
    for position in range(4):
        batched = seeded_tokens(row([1, 2, 3], VOCAB, **params), logits, neighbours(), position)
        assert batched == alone, position


def test_unseeded_rows_get_distinct_keys():
    logits = mx.zeros((2, 1000))
    rows = [row(vocab_size=1000, temperature=1), row(vocab_size=1000, temperature=1)]
    tokens = run_steps(rows, [logits] * 5)
    assert tokens[:, 0].tolist() != tokens[:, 1].tolist()


# ---------------------------------------------------------------- statistics


STAT_LOGITS = [1.0, 2.0, 0.0, -1.0, 0.5, 1.5]
STAT_ROWS, STAT_STEPS = 500, 8  # 4000 draws


def empirical(**params) -> np.ndarray:
    params.setdefault("temperature", 1.0)
    rows = [row(seed=i + 1, **params) for i in range(STAT_ROWS)]
    logits = mx.broadcast_to(mx.array(STAT_LOGITS), (STAT_ROWS, len(STAT_LOGITS)))
    tokens = run_steps(rows, [logits] * STAT_STEPS).reshape(-1)
    return np.bincount(tokens, minlength=len(STAT_LOGITS)) / tokens.size


def softmax(values) -> np.ndarray:
    exps = np.exp(np.asarray(values, np.float64) - np.max(values))
    return exps / exps.sum()


def truncated(probs: np.ndarray, keep: list[int]) -> np.ndarray:
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def assert_close_distribution(observed: np.ndarray, expected: np.ndarray):
    # n = 4000: a standard deviation is at most 0.008, so 0.035 is > 4 sigma
    assert np.max(np.abs(observed - expected)) < 0.035, (observed, expected)
    assert np.all(observed[expected == 0] == 0)


def test_sampling_matches_softmax_over_temperature():
    probs = softmax(np.array(STAT_LOGITS) / 0.7)
    assert_close_distribution(empirical(temperature=0.7), probs)


def test_sampling_matches_renormalized_top_k():
    probs = softmax(STAT_LOGITS)  # order: 1, 5, 0, 4, 2, 3
    assert_close_distribution(empirical(top_k=3), truncated(probs, [1, 5, 0]))


def test_sampling_matches_renormalized_top_p():
    probs = softmax(STAT_LOGITS)  # 0.42, 0.25, 0.15, ...: 0.7 needs 3 tokens
    cumulative = np.cumsum(np.sort(probs)[::-1])
    assert cumulative[1] < 0.7 < cumulative[2]
    assert_close_distribution(empirical(top_p=0.7), truncated(probs, [1, 5, 0]))


def test_low_precision_logits_are_processed_in_float32():
    logits = mx.array([BASE], mx.bfloat16)
    out = process_logits(logits, [row(temperature=0.5, top_k=2)])
    assert out.dtype == mx.float32
    assert kept_tokens(np.array(out)[0]) == [0, 2]
    assert np.array(sample(logits, [row(temperature=0)])).tolist() == [2]
