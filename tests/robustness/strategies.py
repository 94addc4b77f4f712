"""Hypothesis strategies for request bodies, derived from the published input schema.

Valid bodies come from `hypothesis-jsonschema` over the schema with its shape kept whole
(every property, both variants, `"true"`/`"false"` strings for raw and stream) but sizes
bounded so generation stays cheap: short texts, `max_tokens` 1..8, at most 3 messages.
The server's documented limits beyond the schema are applied too (`SERVER_LIMITS`).

Refused bodies are valid ones with fields dropped or replaced by arbitrary JSON; the oracle
`run_body_refused` says whether the published schema (or a server limit) refuses one, which
decides the expected answer independently of the server's own validation code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import jsonschema
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from mlx_gemma.server.schema import input_schema

MAX_TOKENS = 8
SHORT_TEXT = 40
ROLES = ["user", "assistant", "model", "system"]
BOOLEAN_STRINGS = {"true": True, "false": False}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
                   "presence_penalty")
INTEGER_FIELDS = ("max_tokens", "top_k", "seed")


def _bad_messages(body: dict[str, Any]) -> bool:
    return "messages" in body and (not body["messages"] or any(m.get("role") not in ROLES for m in body["messages"]))


# Where the server is stricter than the published schema (each a documented refusal), checked on a
# body the schema accepts: the rule, and whether the body breaks it.
SERVER_LIMITS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "max_tokens is at least 1": lambda body: body.get("max_tokens", 1) < 1,
    "repetition_penalty is above 0 (it divides logits)": lambda body: body.get("repetition_penalty", 1) <= 0,
    "messages is a non-empty list of user, assistant, model or system turns": _bad_messages,
    "functions are not supported": lambda body: bool(body.get("functions")),
    "lora is a string, with either variant": lambda body: "lora" in body and not isinstance(body["lora"], str),
    "no sampling number is NaN": lambda body: any(isinstance(body.get(k), float) and math.isnan(body[k])
                                                  for k in SAMPLING_FIELDS),
}


def variants() -> dict[str, dict[str, Any]]:
    """The published schema's two variants, keyed by their required field ("prompt", "messages")."""
    return {variant["required"][0]: variant for variant in input_schema()["oneOf"]}


def schema_keys() -> list[str]:
    return sorted({key for variant in variants().values() for key in variant["properties"]} | {"lora"})


def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
        st.text(max_size=12)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=max_leaves)


def _boolean_or_string() -> dict[str, Any]:
    return {"enum": [True, False, "true", "false"]}


def serveable_variant(required: str, loras: list[str]) -> dict[str, Any]:
    """One variant of the published schema, bounded in size and within the server's limits."""
    schema = copy.deepcopy(variants()[required])
    props = schema["properties"]
    props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
    props["repetition_penalty"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 2}
    props["stream"] = _boolean_or_string()
    props["lora"] = {"enum": loras}
    schema["required"] = [required, "max_tokens"]  # the default, 256 tokens, is slow to fuzz
    if required == "prompt":
        props["prompt"]["maxLength"] = SHORT_TEXT
        props["raw"] = _boolean_or_string()
    else:
        props["messages"] |= {"minItems": 1, "maxItems": 3}
        item = props["messages"]["items"]["properties"]
        item["role"] = {"enum": ROLES}
        item["content"]["maxLength"] = SHORT_TEXT
        props["functions"]["maxItems"] = 0
    return {"type": "object", **schema, "additionalProperties": False}


def unknown_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Fields the schema does not declare: the server ignores them."""
    names = st.text(min_size=1, max_size=8).filter(lambda name: name not in schema_keys())
    return st.dictionaries(names, json_values(3), max_size=2)


@st.composite
def valid_run_bodies(draw: st.DrawFn, loras: list[str]) -> dict[str, Any]:
    required = draw(st.sampled_from(sorted(variants())))
    body = draw(from_schema(serveable_variant(required, loras)))
    if draw(st.booleans()):  # JSON Schema counts 8.0 as an integer: send some that way
        body = {k: float(v) if k in INTEGER_FIELDS else v for k, v in body.items()}
    return {**draw(unknown_fields()), **body}


def coerced(body: dict[str, Any]) -> dict[str, Any]:
    """The documented coercions: "true"/"false" for raw and stream; integral numbers for integer fields."""
    out = {k: BOOLEAN_STRINGS.get(v, v) if k in ("raw", "stream") and isinstance(v, str) else v
           for k, v in body.items()}
    return {k: int(v) if k in INTEGER_FIELDS and isinstance(v, float) and v.is_integer() else v
            for k, v in out.items()}


def run_body_refused(body: dict[str, Any]) -> bool:
    """Whether the published schema, or one of SERVER_LIMITS, refuses this ai/run body."""
    body = coerced(body)
    if ("prompt" in body) == ("messages" in body):
        return True
    variant = variants()["prompt" if "prompt" in body else "messages"]
    validator = jsonschema.validators.validator_for(input_schema())({"type": "object", **variant})
    return not validator.is_valid(body) or any(breaks(body) for breaks in SERVER_LIMITS.values())


def out_of_range(field: str) -> st.SearchStrategy[Any]:
    """Numbers outside a sampling field's published range, or of the wrong kind."""
    spec = variants()["prompt"]["properties"][field]
    below = st.floats(max_value=spec.get("minimum", 0), exclude_max=True, allow_nan=False)
    above = st.floats(min_value=spec["maximum"], exclude_min=True) if "maximum" in spec else st.nothing()
    wrong = st.sampled_from([float("nan"), "1", True, [1], {"v": 1}, 0.5 if spec["type"] == "integer" else None])
    return below | above | wrong


@st.composite
def refused_run_bodies(draw: st.DrawFn, loras: list[str]) -> dict[str, Any]:
    """A valid body with 1-3 fields dropped, replaced by arbitrary JSON, or set out of range."""
    body = draw(valid_run_bodies(loras))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(schema_keys()))
        action = draw(st.sampled_from(["drop", "replace", "out of range", "both variants"]))
        if action == "drop":
            body.pop(key, None)
        elif action == "replace":
            body[key] = draw(json_values())
        elif action == "out of range" and key in SAMPLING_FIELDS + ("max_tokens",):
            body[key] = draw(out_of_range(key) if key != "max_tokens" else st.integers(max_value=0))
        elif action == "both variants":
            body |= {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}
    assume(run_body_refused(body))
    return body
