"""Generation over token ids: chunked prefill, then a pipelined decode loop.

Contract: `generate_tokens(model, prompt_ids, params, stop_ids, context_length)` yields one
`StepOutput(token, finish_reason)` per generated token; finish_reason is None until the last,
which says "stop" (a stop id was generated; it is counted, not decoded) or "length"
(max_tokens reached, or the model's context is full). The loop is pipelined as mlx-lm's
`generate_step`: step n+1 is built and handed to `mx.async_eval` before step n's token is
read back, so Python's bookkeeping overlaps the model's compute. The engine knows token ids
only, never text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .lora.layers import set_rows
from .models.cache import KVCache, make_cache
from .sampler import GenerationParams, RowSampler, sample

PREFILL_CHUNK = 512


@dataclass(frozen=True)
class StepOutput:
    token: int
    finish_reason: str | None = None


def check_prompt_length(n_prompt: int, context_length: int) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt has no tokens: send some text")
    if n_prompt >= context_length:
        raise ValueError(f"the prompt has {n_prompt} tokens but the model's context holds {context_length}: "
                         "shorten the prompt or the conversation")


def prefill(model: nn.Module, cache: list[KVCache], prompt_ids: Sequence[int]) -> mx.array:
    """Run the prompt through the model in chunks; return the last position's logits (1, vocab)."""
    ids = mx.array(prompt_ids, dtype=mx.int32)[None]
    while ids.shape[1] > PREFILL_CHUNK:
        model(ids[:, :PREFILL_CHUNK], cache=cache, last_only=True)
        mx.eval([c.state for c in cache])
        ids = ids[:, PREFILL_CHUNK:]
    return model(ids, cache=cache, last_only=True)[:, -1, :]


def decode_step(model: nn.Module, cache: list[KVCache], token: mx.array, row: RowSampler) -> mx.array:
    return sample(model(token[:, None], cache=cache)[:, -1, :], [row])


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    stop_ids: frozenset[int],
    context_length: int,
    adapter_slot: int = 0,
) -> Iterator[StepOutput]:
    """adapter_slot: the resident LoRA adapter this request uses (0 = the base model alone)."""
    check_prompt_length(len(prompt_ids), context_length)
    set_rows(model, [adapter_slot])
    limit = min(params.max_tokens, context_length - len(prompt_ids))
    cache = make_cache(len(model.layers))
    row = RowSampler(params, prompt_ids, model.args.vocab_size)
    token = sample(prefill(model, cache, prompt_ids), [row])
    mx.async_eval(token)
    for n in range(1, limit + 1):
        if n < limit:
            next_token = decode_step(model, cache, token, row)
            mx.async_eval(next_token)
        token_id = token.item()
        finish = "stop" if token_id in stop_ids else "length" if n == limit else None
        yield StepOutput(token_id, finish)
        if finish:
            return
        token = next_token
