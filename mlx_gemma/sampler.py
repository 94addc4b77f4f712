"""Per-row token sampling for batched generation (vLLM order and meaning).

For each batch row, the logits (computed in float32) go through, in order:

1. ``repetition_penalty``: every token seen in the prompt or the output so
   far has a positive logit divided by the penalty, a negative one
   multiplied by it (1 means off).
2. ``frequency_penalty``: logit minus ``penalty * count`` of that token in
   the OUTPUT so far; ``presence_penalty``: minus the penalty once if the
   token is present in the OUTPUT.
3. ``temperature``: 0 means greedy argmax (the seed, top_k and top_p are
   then ignored); otherwise logits / temperature, where a temperature
   between 0 and 0.01 counts as 0.01, as in vLLM (smaller ones overflow).
4. ``top_k``: keep the k highest logits, and every token tied with the k-th.
5. ``top_p`` (nucleus, on the probabilities left after top_k, tied tokens
   included): keep the smallest set of highest-probability tokens whose
   cumulative probability is >= top_p, always at least the top token.
   ``top_p >= 1`` keeps every token (no work is done); ``top_p == 0`` keeps
   only the top token (and the tokens tied with it, see below).
6. Sample with the Gumbel-max trick: argmax(logits + Gumbel noise), the
   noise bounded below so a kept token always beats a filtered one.

Filtered tokens become ``-inf``. Both filters cut at a threshold logit, so
tokens tied with the last kept token are kept too. For top_k this is vLLM's
rule; vLLM's top_p instead keeps tied tokens up to the cut in its sort order,
which no meaning of the logits decides, so here a set of equal tokens is
kept or dropped as one (with bfloat16 logits, where ties are common, the
kept set can be a few tokens larger than vLLM's).

Each row owns a PRNG key: ``mx.random.key(seed)``, or a fresh random seed
when none is given. Every step that samples a row splits its key into (next
key, this step's key) and draws the row's noise from this step's key only,
so a seeded request yields the same tokens whatever else is in the batch and
wherever it sits. Greedy rows neither use nor advance their key.

Everything is lazy: ``sample`` never evaluates anything; it returns the
tokens as a lazy int32 array and updates each row's key and output counts
as lazy arrays, so a caller can pipeline steps with ``mx.async_eval``.
Only the full-vocabulary sort needed by a top_p without top_k is
O(V log V), and only the rows with such a top_p pay it; top_k works on
``mx.topk`` candidates, and a batch of plain greedy rows is one ``mx.argmax``.
"""

from __future__ import annotations

import functools
import math
import numbers
import secrets
from dataclasses import dataclass, fields
from typing import Any, Callable, NamedTuple, Sequence

import mlx.core as mx

_NEG_INF = float("-inf")
MIN_TEMPERATURE = 0.01  # vLLM's floor: a smaller positive temperature is raised to it
# Gumbel noise is -log(-log(u)); u == 0 (about once in 2**32 draws) would make it -inf, and a row whose
# only kept token drew it would pick token 0. Every other draw is above -4.
_GUMBEL_FLOOR = -20.0


class _Limit(NamedTuple):
    """Accepted range of one parameter and the fix to suggest."""

    integer: bool
    low: float
    high: float
    low_exclusive: bool
    optional: bool
    fix: str


_LIMITS: dict[str, _Limit] = {
    "max_tokens": _Limit(True, 1, math.inf, False, False, "use an integer >= 1"),
    "temperature": _Limit(
        False, 0, 5, False, False, "use a number from 0 to 5 (0 means greedy)"
    ),
    "top_p": _Limit(
        False, 0, 2, False, True,
        "use a number from 0 to 2 (values >= 1 keep every token, "
        "0 keeps only the top token)",
    ),
    "top_k": _Limit(True, 1, 50, False, True, "use an integer from 1 to 50"),
    "seed": _Limit(True, 1, 9999999999, False, True, "use an integer from 1 to 9999999999"),
    "repetition_penalty": _Limit(
        False, 0, 2, True, True,
        "use a number greater than 0 and at most 2 (1 means off)",
    ),
    "frequency_penalty": _Limit(
        False, 0, 2, False, True, "use a number from 0 to 2 (0 means off)"
    ),
    "presence_penalty": _Limit(
        False, 0, 2, False, True, "use a number from 0 to 2 (0 means off)"
    ),
}


def _plain_number(value: Any) -> Any:
    """A numbers.Integral or numbers.Real that is not Python's own (numpy's int64, float32...) as
    Python's int or float; anything else as it is, for validation to judge."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _limit_problem(name: str, value: Any, limit: _Limit) -> str | None:
    """Describe what is wrong with ``value`` for parameter ``name``, or None."""
    if value is None:
        return None if limit.optional else f"{name} is missing: {limit.fix}"
    allowed = (int,) if limit.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        return f"{name}={value!r} has type {type(value).__name__}: {limit.fix}"
    above_low = value > limit.low if limit.low_exclusive else value >= limit.low
    if not (above_low and value <= limit.high):  # also rejects NaN
        return f"{name}={value!r} is out of range: {limit.fix}"
    return None


class InvalidParams(ValueError):
    """Bad generation parameters: the message names each one and its fix; `names` lists them in order."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


@dataclass(frozen=True)
class GenerationParams:
    """Per-request generation settings, with the Workers AI schema's limits."""

    max_tokens: int = 256
    temperature: float = 0.6
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def __post_init__(self) -> None:
        for field in fields(self):  # numpy scalars and the like count as the Python number they hold
            object.__setattr__(self, field.name, _plain_number(getattr(self, field.name)))

    def validate(self) -> "GenerationParams":
        """Return self, or raise one ValueError naming every bad parameter."""
        problems = [
            _limit_problem(field.name, getattr(self, field.name), _LIMITS[field.name])
            for field in fields(self)
        ]
        bad = {field.name: problem for field, problem in zip(fields(self), problems) if problem}
        if bad:
            raise InvalidParams("; ".join(bad.values()), list(bad))
        return self


class RowSampler:
    """Sampling state of one batch row: its params, its PRNG key, its token history for penalties."""

    def __init__(self, params: GenerationParams, prompt_ids: Sequence[int], vocab_size: int):
        self.params = params.validate()
        self.vocab_size = vocab_size
        self.is_greedy = params.temperature == 0
        sampling = not self.is_greedy
        self.temperature = max(float(params.temperature), MIN_TEMPERATURE) if sampling else 0.0
        self.top_k = min(params.top_k, vocab_size) if sampling and params.top_k else None
        keeps_all = params.top_p is None or params.top_p >= 1
        self.top_p = None if (self.is_greedy or keeps_all) else float(params.top_p)
        self.repetition_penalty = _active(params.repetition_penalty, off=1.0)
        self.frequency_penalty = _active(params.frequency_penalty, off=0.0)
        self.presence_penalty = _active(params.presence_penalty, off=0.0)
        self.has_penalty = any(
            penalty is not None
            for penalty in (self.repetition_penalty, self.frequency_penalty, self.presence_penalty)
        )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed)
        self._output_counts = mx.zeros((vocab_size,), mx.float32) if self.has_penalty else None
        self._prompt_mask = (
            _token_mask(prompt_ids, vocab_size) if self.repetition_penalty is not None else None
        )

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no penalty: its token is the argmax of the raw logits."""
        return self.is_greedy and not self.has_penalty

    def next_step_key(self) -> mx.array:
        """Split the key lazily: keep one half for later, return the other for this step."""
        next_key, step_key = mx.random.split(self._key)
        self._key = next_key
        return step_key

    def record(self, token: mx.array) -> None:
        """Lazily count ``token`` (a scalar array) in the output history."""
        if self._output_counts is not None:
            self._output_counts = self._output_counts.at[token].add(1.0)

    def penalize(self, row_logits: mx.array) -> mx.array:
        """Apply repetition, frequency and presence penalties to one (V,) row."""
        counts = self._output_counts
        if self.repetition_penalty is not None:
            seen = self._prompt_mask | (counts > 0)
            penalty = self.repetition_penalty
            penalized = mx.where(row_logits > 0, row_logits / penalty, row_logits * penalty)
            row_logits = mx.where(seen, penalized, row_logits)
        if self.frequency_penalty is not None:
            row_logits = row_logits - self.frequency_penalty * counts
        if self.presence_penalty is not None:
            row_logits = row_logits - self.presence_penalty * (counts > 0)
        return row_logits

    def state(self) -> list[mx.array]:
        """The row's lazy state arrays, e.g. to pass to ``mx.async_eval``."""
        arrays = [self._key, self._output_counts, self._prompt_mask]
        return [array for array in arrays if array is not None]


def _active(penalty: float | None, off: float) -> float | None:
    """The penalty as a float, or None when absent or equal to its 'off' value."""
    return None if penalty is None or penalty == off else float(penalty)


def _token_mask(token_ids: Sequence[int], vocab_size: int) -> mx.array:
    """Boolean (V,) mask of the in-vocabulary tokens among ``token_ids``."""
    mask = mx.zeros((vocab_size,), mx.bool_)
    ids = [token for token in token_ids if 0 <= token < vocab_size]
    if ids:
        mask[mx.array(ids, mx.int32)] = True
    return mask


def _apply_penalties(logits: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    if not any(row.has_penalty for row in rows):
        return logits
    return mx.stack(
        [row.penalize(logits[i]) if row.has_penalty else logits[i] for i, row in enumerate(rows)]
    )


def _apply_temperature(logits: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    divisors = [1.0 if row.is_greedy else row.temperature for row in rows]
    if all(divisor == 1.0 for divisor in divisors):
        return logits
    return logits / mx.array(divisors, mx.float32)[:, None]


def _sorted_candidates(logits: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    """Logits sorted descending: all of them if some row has top_p alone, else the top max-k."""
    if any(row.top_p is not None and row.top_k is None for row in rows):
        return mx.sort(logits, axis=-1)[:, ::-1]
    widest_k = max(row.top_k for row in rows if row.top_k is not None)
    return mx.sort(mx.topk(logits, widest_k, axis=-1), axis=-1)[:, ::-1]


def _filter_groups(rows: Sequence[RowSampler]) -> list[list[int]]:
    """The rows that top_k/top_p filter, split by the work they need: a row with top_p alone needs
    the whole vocabulary sorted, a row with top_k only its k best. Each group is computed apart,
    so one request's top_p does not sort the vocabulary of every row in the batch."""
    whole = [i for i, row in enumerate(rows) if row.top_p is not None and row.top_k is None]
    best_k = [i for i, row in enumerate(rows) if row.top_k is not None]
    return [group for group in (whole, best_k) if group]


def _apply_top_k_top_p(logits: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    """Set to -inf every logit below the row's last kept candidate."""
    groups = _filter_groups(rows)
    if not groups:
        return logits
    if len(groups) == 1 and len(groups[0]) == len(rows):  # every row filtered alike: no gather, no scatter
        return mx.where(logits >= _thresholds(logits, rows), logits, _NEG_INF)
    threshold = mx.full((len(rows), 1), _NEG_INF, dtype=logits.dtype)
    for group in groups:
        index = mx.array(group, mx.int32)
        threshold[index] = _thresholds(logits[index], [rows[i] for i in group])
    return mx.where(logits >= threshold, logits, _NEG_INF)


def _thresholds(logits: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    """(B, 1): each row's last kept logit, for rows that all have top_k or top_p."""
    candidates = _sorted_candidates(logits, rows)
    width = candidates.shape[-1]
    ks = mx.array([row.top_k or width for row in rows], mx.int32)[:, None]
    kth = mx.take_along_axis(candidates, ks - 1, axis=-1)  # ties with the k-th are kept, as in vLLM
    candidates = mx.where(candidates >= kth, candidates, _NEG_INF)
    kept = candidates > _NEG_INF
    if any(row.top_p is not None for row in rows):
        top_ps = mx.array([row.top_p if row.top_p is not None else 2.0 for row in rows])[:, None]
        kept = kept & (mx.cumsum(_top_k_probs(logits, candidates, kth), axis=-1, inclusive=False) < top_ps)
    kept_count = mx.maximum(kept.sum(axis=-1, keepdims=True), 1)
    return mx.take_along_axis(candidates, kept_count - 1, axis=-1)


def _top_k_probs(logits: mx.array, candidates: mx.array, kth: mx.array) -> mx.array:
    """The candidates' probabilities among every token top_k keeps, over the whole vocabulary: tokens
    tied with the k-th may lie past the candidate window and still take their share."""
    top = candidates[:, :1]
    total = mx.sum(mx.where(logits >= kth, mx.exp(logits - top), 0.0), axis=-1, keepdims=True)
    return mx.exp(candidates - top) / total


def process_logits(logits: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    """(B, V) float32 logits after penalties, temperature and top_k/top_p masks (-inf).

    Greedy rows get penalties only (no temperature, no filters). Lazy; reads
    but does not change the rows' state.
    """
    if logits.ndim != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits shape {logits.shape} does not match {len(rows)} rows")
    logits = logits.astype(mx.float32)
    logits = _apply_penalties(logits, rows)
    logits = _apply_temperature(logits, rows)
    return _apply_top_k_top_p(logits, rows)


@functools.lru_cache(maxsize=16)
def _batched_gumbel(vocab_size: int) -> Callable[[mx.array], mx.array]:
    """Map (S, 2) keys to (S, V) Gumbel noise; row i depends only on key i."""
    return mx.vmap(lambda key: mx.maximum(mx.random.gumbel(shape=(vocab_size,), key=key), _GUMBEL_FLOOR))


def _draw(processed: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    """Greedy argmax for greedy rows, Gumbel-max with the row's own key for the rest."""
    sampling = [i for i, row in enumerate(rows) if not row.is_greedy]
    if not sampling:
        return mx.argmax(processed, axis=-1)
    step_keys = mx.stack([rows[i].next_step_key() for i in sampling])
    noise = _batched_gumbel(processed.shape[-1])(step_keys)
    if len(sampling) == len(rows):
        return mx.argmax(processed + noise, axis=-1)
    sampling_index = mx.array(sampling, mx.int32)
    tokens = mx.argmax(processed, axis=-1)
    tokens[sampling_index] = mx.argmax(processed[sampling_index] + noise, axis=-1)
    return tokens


def sample(logits: mx.array, rows: Sequence[RowSampler]) -> mx.array:
    """Choose one token per row of (B, V) ``logits``; returns a lazy int32 (B,) array.

    Advances each sampling row's key and records the tokens for penalties,
    all lazily (no evaluation happens here).
    """
    if all(row.is_plain_greedy for row in rows):
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    tokens = _draw(process_logits(logits, rows), rows).astype(mx.int32)
    for i, row in enumerate(rows):
        row.record(tokens[i])
    return tokens
