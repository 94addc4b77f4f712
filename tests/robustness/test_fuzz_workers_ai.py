"""Fuzzing the Workers AI routes of a live server: ai/run, fine-tune creation and asset upload.

Valid ai/run bodies (from the published input schema, see strategies.py) get 200 and an answer
valid against the published output schema, streamed or not. Everything else gets its exact 4xx
and the error envelope: bodies the schema refuses, unknown models and loras, non-JSON, huge
bodies. Never a 5xx, never a hang (each request has a timeout).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from mlx_gemma.server.schema import shortened

from .conftest import FuzzTarget
from .strategies import coerced, json_values, refused_run_bodies, valid_run_bodies
from .support import (ACCOUNT_PATH, ASSETS, FINETUNES_PATH, MODEL, RUN_PATH, Fuzzer, check_run_json,
                      check_run_stream, fuzz_settings, workers_ai_error)

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_PROMPT_CHARS = 131072
NAME_PATTERN = r"\A[A-Za-z0-9_-][A-Za-z0-9_.-]{0,40}\Z"


def run_path(model: str) -> str:
    return f"{ACCOUNT_PATH}/run/{quote(model, safe='@').replace('.', '%2E')}"


@fuzz_settings(400)
@given(data=st.data())
def test_valid_run_bodies_get_a_schema_valid_answer(fuzzer: Fuzzer, fuzz_target: FuzzTarget,
                                                    data: st.DataObject) -> None:
    body = data.draw(valid_run_bodies(fuzz_target.finetunes), label="body")
    model = data.draw(st.sampled_from(fuzz_target.service.served_models()), label="model")
    response = fuzzer.post_json(run_path(model), body)
    check = check_run_stream if coerced(body).get("stream") else check_run_json
    check(response, coerced(body)["max_tokens"])


@fuzz_settings(500)
@given(data=st.data())
def test_bodies_the_schema_refuses_get_400(fuzzer: Fuzzer, fuzz_target: FuzzTarget, data: st.DataObject) -> None:
    body = data.draw(refused_run_bodies(fuzz_target.finetunes), label="body")
    message = workers_ai_error(fuzzer.post_json(RUN_PATH, body), 400, 5006)
    assert message.startswith("AiError: Bad input: ")


@fuzz_settings(100)
# Routes match no newline in a path; an empty model leaves `run/`, which is served as `run`: no route.
@given(model=st.text(min_size=1, max_size=40).filter(lambda m: "\n" not in m))
def test_unknown_models_get_5007(fuzzer: Fuzzer, fuzz_target: FuzzTarget, model: str) -> None:
    if model in fuzz_target.service.served_models():
        return
    response = fuzzer.post_json(run_path(model), {"prompt": "Hi", "max_tokens": 1})
    assert workers_ai_error(response, 400, 5007).startswith(f"AiError: No such model {shortened(model)}: this server serves ")


@fuzz_settings(100)
@given(lora=st.text(max_size=40), messages=st.booleans())
def test_unknown_loras_get_3037(fuzzer: Fuzzer, fuzz_target: FuzzTarget, lora: str, messages: bool) -> None:
    if lora in fuzz_target.finetunes:
        return
    text = {"messages": [{"role": "user", "content": "Hi"}]} if messages else {"prompt": "Hi"}
    response = fuzzer.post_json(RUN_PATH, {**text, "lora": lora, "max_tokens": 1})
    assert f"no fine-tune has the id or name {shortened(lora)} " in workers_ai_error(response, 404, 3037)


def is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


def not_json_objects() -> st.SearchStrategy[bytes]:
    """Bytes that are no JSON object: noise, other JSON values, deep nesting, bad UTF-8, lone surrogates."""
    noise = st.binary(max_size=200).filter(lambda raw: not is_json_object(raw))
    other_values = json_values().filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
    nested = st.integers(1000, 200_000).map(lambda depth: b"[" * depth + b"]" * depth)
    bad_utf8 = st.binary(min_size=1, max_size=20).map(lambda b: b'{"prompt": "' + b"\xff" + b + b'"}')
    surrogate = st.sampled_from(["\\ud800", "\\udfff", "a\\udc00b", "\\ud83d"]).map(
        lambda s: json.dumps({"prompt": "x", "max_tokens": 1}).replace('"x"', f'"{s}"').encode())
    return st.one_of(noise, other_values, nested, bad_utf8, surrogate)


@fuzz_settings(150)
@given(raw=not_json_objects(), path=st.sampled_from([RUN_PATH, FINETUNES_PATH]))
def test_bodies_that_are_not_json_objects_get_400(fuzzer: Fuzzer, raw: bytes, path: str) -> None:
    response = fuzzer.send("POST", path, content=raw, headers={"content-type": "application/json"})
    assert workers_ai_error(response, 400, 5006).startswith("AiError: Bad input: ")


def huge_body(size: int, field: str) -> dict[str, Any]:
    if field == "prompt":
        return {"prompt": "x" * size, "max_tokens": 1}
    return {"messages": [{"role": "user", "content": "x" * size}], "max_tokens": 1}


@fuzz_settings(12)
@given(size=st.integers(MAX_PROMPT_CHARS + 1, MAX_BODY_BYTES - 100), field=st.sampled_from(["prompt", "messages"]))
def test_texts_over_the_schema_limit_get_400(fuzzer: Fuzzer, size: int, field: str) -> None:
    message = workers_ai_error(fuzzer.post_json(RUN_PATH, huge_body(size, field)), 400, 5006)
    assert "is too long" in message


@fuzz_settings(8)
@given(size=st.integers(MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 2_000_000))
def test_bodies_over_the_size_limit_get_413(fuzzer: Fuzzer, size: int) -> None:
    message = workers_ai_error(fuzzer.post_json(RUN_PATH, huge_body(size, "prompt")), 413, 3006)
    assert f"over the limit of {MAX_BODY_BYTES} bytes" in message


# --- fine-tunes: creation and asset upload ----------------------------------------------------------------------

def create_refusal(body: dict[str, Any], taken: list[str]) -> tuple[int, int, str] | None:
    """The expected (status, code, part of the message) for a POST finetunes body; None if it is accepted."""
    model, name, description = body.get("model"), body.get("name"), body.get("description")
    if not isinstance(model, str) or not isinstance(name, str):
        return 400, 5006, '"model" and "name" strings'
    if model != MODEL:
        return 400, 5007, f"No such model {shortened(model)}"
    if (description and not isinstance(description, str)) or not isinstance(body.get("public", False), bool):
        return 400, 5006, '"description" must be a string and "public" a boolean'
    if len(name) > 128 or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        return 400, 5006, f"fine-tune name {name!r} is refused"
    if description and len(description) > 1024:
        return 400, 5006, f"description of {len(description)} characters is refused"
    return (409, 5006, f"a fine-tune named {name!r} already exists") if name in taken else None


@st.composite
def finetune_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = {"model": MODEL, "name": draw(st.from_regex(NAME_PATTERN)),
            "description": draw(st.text(max_size=1100)), "public": draw(st.booleans())}
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body[key] = draw(json_values() | st.text(max_size=200) | st.sampled_from(["../x", "a/b", ".hidden", "x" * 129]))
    return body


@fuzz_settings(200)
@given(body=finetune_bodies())
def test_finetune_creation(fuzzer: Fuzzer, fuzz_target: FuzzTarget, body: dict[str, Any]) -> None:
    response = fuzzer.post_json(FINETUNES_PATH, body)
    expected = create_refusal(body, fuzz_target.finetunes)
    if expected is not None:
        status, code, fragment = expected
        assert fragment in workers_ai_error(response, status, code)
        return
    assert response.status_code == 200, response.text[:400]
    created = response.json()["result"]
    assert {k: created[k] for k in ("name", "model", "public")} == {k: body[k] for k in ("name", "model", "public")}
    deleted = fuzzer.send("DELETE", f"{FINETUNES_PATH}/{created['id']}")
    assert deleted.status_code == 200 and deleted.json()["result"]["id"] == created["id"]


def asset_names() -> st.SearchStrategy[str]:
    return st.text(max_size=30).filter(lambda name: name not in ASSETS) | st.sampled_from(
        ["../adapter_config.json", "/etc/passwd", "adapter_model.safetensors/../../x", "..", ""])


@fuzz_settings(120)
@given(file_name=asset_names(), content=st.binary(max_size=300))
def test_uploads_under_other_file_names_are_refused(fuzzer: Fuzzer, fuzz_target: FuzzTarget, file_name: str,
                                                    content: bytes) -> None:
    response = fuzzer.send("POST", f"{FINETUNES_PATH}/fuzz-all7/finetune-assets", data={"file_name": file_name},
                           files={"file": ("upload.bin", content)})
    message = workers_ai_error(response, 400, 5006)
    assert f"file_name {file_name!r} is not an asset" in message or (not file_name and "file_name field" in message)


@fuzz_settings(80)
@given(file_name=st.sampled_from(ASSETS), content=st.binary(min_size=1, max_size=300).filter(
    lambda raw: not is_json_object(raw)))
def test_uploads_of_noise_are_refused_and_change_nothing(fuzzer: Fuzzer, fuzz_target: FuzzTarget, file_name: str,
                                                        content: bytes) -> None:
    before = fuzz_target.service.store.get("fuzz-all7")
    response = fuzzer.send("POST", f"{FINETUNES_PATH}/fuzz-all7/finetune-assets", data={"file_name": file_name},
                           files={"file": (file_name, content)})
    assert f"{file_name} for fine-tune 'fuzz-all7' refused: " in workers_ai_error(response, 400, 5006)
    assert fuzz_target.service.store.get("fuzz-all7") == before


MALFORMED_FORMS = {
    "no form at all": {"content": b'{"file_name": "adapter_config.json"}',
                       "headers": {"content-type": "application/json"}},
    "no boundary": {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
    "garbage": {"content": b"\x00\xffnot multipart", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
    "no file": {"data": {"file_name": "adapter_config.json"}, "files": {}},
    "no file_name": {"files": {"file": ("adapter_config.json", b"{}")}},
    "two files": {"data": {"file_name": "adapter_config.json"},
                  "files": [("file", ("a", b"{}")), ("file", ("b", b"{}"))]},
}


@fuzz_settings(30)
@given(case=st.sampled_from(sorted(MALFORMED_FORMS)), target=st.sampled_from(["fuzz-all7", "fuzz-second"]))
def test_malformed_upload_forms_get_400(fuzzer: Fuzzer, case: str, target: str) -> None:
    response = fuzzer.send("POST", f"{FINETUNES_PATH}/{target}/finetune-assets", **MALFORMED_FORMS[case])
    assert workers_ai_error(response, 400, 5006).startswith("AiError: Bad input: ")


@fuzz_settings(60)
@given(finetune=st.text(min_size=1, max_size=30).filter(lambda f: "/" not in f and f not in (".", "..")))
def test_uploads_to_unknown_finetunes_get_3037(fuzzer: Fuzzer, fuzz_target: FuzzTarget, finetune: str) -> None:
    if finetune in fuzz_target.finetunes:
        return
    response = fuzzer.send("POST", f"{FINETUNES_PATH}/{quote(finetune, safe='')}/finetune-assets",
                           data={"file_name": ASSETS[0]}, files={"file": (ASSETS[0], b"{}")})
    assert f"no fine-tune has the id or name {shortened(finetune)} " in workers_ai_error(response, 404, 3037)


def test_the_store_is_as_it_was(fuzz_target: FuzzTarget) -> None:
    store = fuzz_target.service.store
    assert store.check() == []
    assert [(f.name, f.files) for f in store.list()] == [(name, ASSETS) for name in fuzz_target.finetunes]
