"""Shared by the robustness tests: paths, the fuzzing client, envelope and stream checks.

`Fuzzer` sends requests to a live loopback server with a per-request timeout (a hang is a
failure, not a stuck run) and counts each one. The `*_error` helpers assert the exact error
shapes: the Workers AI envelope, or OpenAI's error object under /v1/.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
from hypothesis import HealthCheck, settings

from mlx_gemma.server.background import serving as live_server  # noqa: F401  (TCP_NODELAY, a free port)
from mlx_gemma.server.schema import SPEC_DIR

from .tally import count

MODEL = "@cf/google/gemma-2b-it-lora"
ACCOUNT_PATH = "/client/v4/accounts/robust0123/ai"
RUN_PATH = f"{ACCOUNT_PATH}/run/{MODEL}"
FINETUNES_PATH = f"{ACCOUNT_PATH}/finetunes"
ASSETS = ("adapter_config.json", "adapter_model.safetensors")
REQUEST_TIMEOUT_S = 20.0
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      413: "invalid_request_error"}
OUTPUT_SCHEMA = json.loads((SPEC_DIR / "gemma-2b-it-lora.output.schema.json").read_text())


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis, reproducible: derandomized, no deadline, no example database on disk."""
    slow_data = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                 HealthCheck.large_base_example]
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=slow_data, print_blob=False)


class Fuzzer:
    """An httpx client for one live server: counts every request; a timeout fails the test as a hang."""

    def __init__(self, base_url: str):
        self.http = httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S)

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        count("fuzzed")
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise AssertionError(f"{method} {path} hung: no answer within {REQUEST_TIMEOUT_S} s") from exc

    def post_json(self, path: str, body: Any) -> httpx.Response:
        return self.send("POST", path, content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"})

    def close(self) -> None:
        self.http.close()


def workers_ai_error(response: httpx.Response, status: int, code: int) -> str:
    """Assert the Workers AI error envelope with this status and code; return its message."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:400]}"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    message = body["errors"][0]["message"] if body.get("errors") else None
    assert isinstance(message, str) and message, body
    assert body == {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}
    return message


def openai_error(response: httpx.Response, status: int, code: int, param: str | set[str] | None = None) -> str:
    """Assert OpenAI's error object with this status and code, naming `param` (or one of a set of
    fields) as the field at fault; return its message. An unknown model is OpenAI's own
    invalid_request_error with code model_not_found."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:400]}"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    message = body.get("error", {}).get("message")
    assert isinstance(message, str) and message, body
    named = body["error"].get("param")
    assert named in param if isinstance(param, set) else named == param, body
    if (status, code) == (404, 3037):
        assert body == {"error": {"message": message, "type": "invalid_request_error", "param": named,
                                  "code": "model_not_found"}}
        return message
    assert body == {"error": {"message": message, "type": OPENAI_ERROR_TYPES[status], "param": named, "code": code}}
    return message


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a complete event stream, in order; every block must be one data line."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.text[:400]
    blocks = [block for block in response.text.split("\n\n") if block]
    assert response.text.endswith("\n\n") and all(b.startswith("data: ") and "\n" not in b for b in blocks), \
        response.text[-400:]
    return [block.removeprefix("data: ") for block in blocks]


def check_usage(usage: dict[str, Any], max_tokens: int) -> None:
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_run_json(response: httpx.Response, max_tokens: int) -> None:
    """A non-streamed ai/run answer: the success envelope, its result valid against the output schema."""
    assert response.status_code == 200, response.text[:400]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert {k: body[k] for k in ("success", "errors", "messages")} == {"success": True, "errors": [], "messages": []}
    jsonschema.validate(body["result"], OUTPUT_SCHEMA)
    assert set(body["result"]) == {"response", "usage"}
    check_usage(body["result"]["usage"], max_tokens)


def check_run_stream(response: httpx.Response, max_tokens: int) -> None:
    """A streamed ai/run answer: the body valid against the output schema's event-stream variant;
    `{"response"}` pieces, then one with usage, then [DONE]."""
    assert response.status_code == 200, response.text[:400]
    jsonschema.validate(response.text, OUTPUT_SCHEMA)
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]
    for event in events:
        jsonschema.validate(event, OUTPUT_SCHEMA)
    assert all(set(event) == {"response"} for event in events[:-1])
    assert events[-1]["response"] == "" and set(events[-1]) == {"response", "usage"}
    check_usage(events[-1]["usage"], max_tokens)
