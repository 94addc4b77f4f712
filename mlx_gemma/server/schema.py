"""Request validation against the published schema, the Workers AI envelopes and error codes.

Contract:
- `ApiError(status, code, message)` is what every route raises for a bad request; handlers in
  app.py turn it into the Workers AI error envelope (or OpenAI's error object on /v1 routes).
  The named constructors below give each Workers AI code its status.
- `parse_json(raw)` -> dict, or ApiError 5006 naming the problem (not JSON, not an object,
  nested too deep to parse, or holding a lone UTF-16 surrogate, which no text can encode).
- `validate_run_body(body)` checks an `ai/run` body against the published input schema
  (spec/gemma-2b-it-lora.input.schema.json): exactly one of `prompt` / `messages`, each field
  within the schema's limits; `"true"`/`"false"` strings are accepted for `raw` and `stream`;
  `lora` is accepted with either variant. It returns the body with those strings coerced, and
  integral numbers of integer fields (`8.0`, an integer in JSON Schema) made ints.
- `success(result)` and `failure(code, message)` build the envelopes; `as_api_error(exc)` is the
  ApiError any exception reports as (an unexpected one is a 500, code 3043).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SPEC_DIR = Path(__file__).resolve().parent / "spec"
BOOLEAN_FIELDS = ("raw", "stream")
INTEGER_FIELDS = ("max_tokens", "top_k", "seed")
UNSUPPORTED_FIELDS = {"functions": "function calling is not supported by this model: describe the tools in the prompt"}


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_input(message: str) -> ApiError:
    return ApiError(400, 5006, f"AiError: Bad input: {message}")


def unknown_model(model: str, served: list[str]) -> ApiError:
    return ApiError(400, 5007, f"AiError: No such model {shortened(model)}: this server serves {', '.join(served)}")


def finetune_not_found(value: str) -> ApiError:
    return ApiError(404, 3037, f"AiError: Finetune not found: no fine-tune has the id or name {shortened(value)} "
                               "(list them with GET /client/v4/accounts/{account_id}/ai/finetunes)")


def finetune_incomplete(name: str, missing: list[str]) -> ApiError:
    return ApiError(400, 3039, f"AiError: Finetune {name!r} is missing {' and '.join(missing)}: upload "
                               "it with POST .../ai/finetunes/{id}/finetune-assets")


def too_large(size: int, limit: int) -> ApiError:
    return request_too_large(f"{size} bytes is over the limit of {limit} bytes")


def request_too_large(reason: str) -> ApiError:
    return ApiError(413, 3006, f"AiError: Request too large: {reason}")


def name_conflict(reason: str) -> ApiError:
    """A fine-tune name that is taken (by another fine-tune, or by an adapter loaded at start)."""
    return ApiError(409, 5006, f"AiError: Bad input: {reason}")


def out_of_capacity(reason: str) -> ApiError:
    return ApiError(429, 3040, f"AiError: Out of capacity: {reason}")


def storage_full(error: Exception) -> ApiError:
    return ApiError(507, 3043, f"AiError: Insufficient storage: the fine-tune store's disk is full ({error}): "
                               "nothing was changed; free disk space or delete fine-tunes, then retry")


def unauthorized(reason: str) -> ApiError:
    return ApiError(401, 10000, f"Authentication error: {reason}")


def success(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def failure(code: int, message: str) -> dict[str, Any]:
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def as_api_error(exc: BaseException) -> ApiError:
    """What an exception reports as: an ApiError is itself, anything else an internal error (500, 3043)."""
    if isinstance(exc, ApiError):
        return exc
    return ApiError(500, 3043, f"AiError: Internal server error: {type(exc).__name__}: {exc}")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_input(f"the body is not valid JSON ({exc}): send a JSON object such as "
                        '{"prompt": "Hello"}') from None
    except RecursionError:
        raise bad_input("the body nests arrays or objects too deeply to parse: send a flatter JSON object") from None
    if not isinstance(body, dict):
        raise bad_input(f"the body must be a JSON object, got {type(body).__name__}")
    if (text := _lone_surrogate_text(body)) is not None:
        raise bad_input(f"the string {text[:40]!r} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
                        "send text as valid Unicode (a surrogate pair, or the character itself)")
    return body


def _lone_surrogate_text(body: Any) -> str | None:
    """The first string (key or value) that holds an unpaired surrogate, or None."""
    pending = [body]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return value
    return None


@cache
def input_schema() -> dict[str, Any]:
    return json.loads((SPEC_DIR / "gemma-2b-it-lora.input.schema.json").read_text())


@cache
def _variant_validators() -> dict[str, jsonschema.protocols.Validator]:
    variants = input_schema()["oneOf"]
    cls = jsonschema.validators.validator_for(input_schema())
    return {variant["required"][0]: cls({"type": "object", **variant}) for variant in variants}


def validate_run_body(body: dict[str, Any]) -> dict[str, Any]:
    body = _coerce(body)
    variant = _variant(body)
    problems = [_describe(error) for error in _variant_validators()[variant].iter_errors(body)]
    problems += [f"{name}: {why}" for name, why in UNSUPPORTED_FIELDS.items() if body.get(name)]
    if "lora" in body and not isinstance(body["lora"], str):
        problems.append(f"lora: {shortened(body['lora'])} is not of type 'string'")
    if problems:
        raise bad_input("; ".join(sorted(set(problems))))
    return body


def integral(value: Any) -> Any:
    """8.0 -> 8, as JSON Schema (and pydantic) read an integer field; anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _coerce(body: dict[str, Any]) -> dict[str, Any]:
    strings = {"true": True, "false": False}
    body = {key: strings.get(value, value) if key in BOOLEAN_FIELDS and isinstance(value, str) else value
            for key, value in body.items()}
    return {key: integral(value) if key in INTEGER_FIELDS else value
            for key, value in body.items()}


def _variant(body: dict[str, Any]) -> str:
    if "prompt" in body and "messages" in body:
        raise bad_input("send either prompt or messages, not both")
    if "prompt" not in body and "messages" not in body:
        raise bad_input('the body needs prompt (a string) or messages (a list of {"role", "content"}), '
                        'for example {"prompt": "Hello"}')
    return "prompt" if "prompt" in body else "messages"


def _describe(error: jsonschema.ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f"{where or 'body'}: {error.message.replace(repr(error.instance), shortened(error.instance))}"


def shortened(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters: an error names a value without echoing megabytes back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 20]}... ({len(value) if isinstance(value, str) else len(text)} characters)"
