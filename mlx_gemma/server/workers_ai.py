"""Cloudflare Workers AI routes, under /client/v4/accounts/{account_id}/ai/.

Contract (DESIGN.md section 6): `POST run/{model}` answers with the success envelope
`{"result": {"response", "usage"}, ...}` or, with `stream: true`, with server-sent events
`data: {"response":"..."}` per piece, then `data: {"response":"","usage":{...}}`, then
`data: [DONE]`; a stream that fails part way ends with the error envelope as one event, then
`data: [DONE]`. Fine-tunes: `POST finetunes`, `GET finetunes`, `GET finetunes/public`,
`GET`/`DELETE finetunes/{id or name}`, `POST finetunes/{id or name}/finetune-assets`
(multipart `file_name` + `file`, refused with 413 as soon as it passes the upload limit);
`finetunes/public` pages with `limit`, `offset` and `orderBy`. With `messages`, `raw` is accepted
and has no effect. A client that disconnects before its answer begins (queued, prefilling, or
waiting for a whole non-streamed answer) cancels its generation; it gets an empty 499. Every
failure is an ApiError, rendered by app.py; a fine-tune store whose disk (or quota) is full
answers 507 (code 3043) and is left unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..lora.store import AssetError, AssetTooLarge, FinetuneError, FinetuneExists, FinetuneNotFound, is_disk_full
from .schema import (ApiError, as_api_error, bad_input, failure, finetune_not_found, name_conflict, parse_json,
                     request_too_large, storage_full, success, too_large, validate_run_body)
from .service import AsyncTextStream, Service

PREFIX = "/client/v4/accounts/{account_id}/ai"
RUN_FIELDS = ("prompt", "messages", "raw", "max_tokens", "temperature", "top_p", "top_k", "seed",
              "repetition_penalty", "frequency_penalty", "presence_penalty")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
FORM_OVERHEAD_BYTES = 64 * 1024  # an upload's multipart framing and file_name field, beyond the file
OFF_LOOP_BYTES = 64 * 1024  # bodies past this are parsed on a worker thread
ORDER_COLUMNS = ("id", "name", "model", "description", "created_at", "modified_at")
T = TypeVar("T")
log = logging.getLogger("mlx_gemma.server")


class ClientGone(Exception):
    """The client disconnected before its answer began; its generation has been cancelled."""


def unless_gone(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint whose client may leave while it waits: nobody reads the answer then, so send an empty 499."""
    @functools.wraps(endpoint)
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ClientGone:
            return Response(status_code=499)
    return answer


async def while_connected(request: Request, stream: AsyncTextStream, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first: then cancel the stream, so its row leaves the
    batch at the next step (or never starts), and raise ClientGone."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # only asks: the task is not cancelled (nor done) until the loop runs it again
            stream.cancel()
    if task not in done:
        raise ClientGone()
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def service_of(request: Request) -> Service:
    return request.app.state.service


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 3006 as soon as it passes `limit` bytes."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise too_large(declared, limit)
    return b"".join([chunk async for chunk in _limited(request.stream(), limit)])


async def read_json(request: Request) -> dict[str, Any]:
    """The body as JSON; a large one is parsed off the event loop (megabytes take a tenth of a second)."""
    raw = await read_body(request, service_of(request).settings.max_body_bytes)
    return await asyncio.to_thread(parse_json, raw) if len(raw) > OFF_LOOP_BYTES else parse_json(raw)


# Characters JSON leaves raw that line readers built on str.splitlines (httpx's iter_lines, and so
# httpx-sse and the cloudflare SDK) take for line ends, which would cut an event in two.
_SPLITLINES_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <compact JSON>` on a single line, whatever the text holds."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text.translate(_SPLITLINES_ESCAPES)}\n\n".encode()


async def until_error(events: AsyncIterator[bytes], describe: Callable[[ApiError], dict[str, Any]]
                      ) -> AsyncIterator[bytes]:
    """The events; if they fail part way, then one event with `describe(error)` and `data: [DONE]`.
    The status line has gone out by then, so the stream is the only place left to tell the error."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        log.exception("a stream ended with an error")
        yield sse(describe(as_api_error(exc)))
        yield sse("[DONE]")


async def started(stream: AsyncTextStream) -> AsyncIterator[str]:
    """Wait for the first piece (prefill and adapter errors still become HTTP errors), then go on."""
    try:
        first = await anext(stream, None)
    except BaseException:
        stream.cancel()
        raise

    async def pieces() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for piece in stream:
                yield piece
        finally:
            stream.cancel()  # also runs when the client disconnects and the task is cancelled

    return pieces()


@unless_gone
async def run(request: Request) -> Response:
    service = service_of(request)
    service.check_model(request.path_params["model"])
    service.check_room()
    # Checked off the event loop: the schema check of a body of many messages takes seconds.
    body = await asyncio.to_thread(validate_run_body, await read_json(request))
    lora = await service.resolve_lora(body.get("lora"))
    ids, params = await service.prepare(lora, **run_fields(body))
    stream = service.open_stream(ids, params, lora)
    if body.get("stream"):
        pieces = await while_connected(request, stream, started(stream))
        events = until_error(run_events(stream, pieces), lambda error: failure(error.code, error.message))
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    text = await while_connected(request, stream, stream.text())
    return JSONResponse(success({"response": text, "usage": stream.usage.to_dict()}))


def run_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The generation fields of a run body. Messages always take the chat template: `raw` is read only
    with a prompt (Cloudflare's own LoRA example sends `"raw": "true"` with messages)."""
    fields = {k: body[k] for k in RUN_FIELDS if k in body}
    if "messages" in fields:
        fields.pop("raw", None)
    return fields


async def run_events(stream: AsyncTextStream, pieces: AsyncIterator[str]) -> AsyncIterator[bytes]:
    async for piece in pieces:
        yield sse({"response": piece})
    yield sse({"response": "", "usage": stream.usage.to_dict()})
    yield sse("[DONE]")


@unless_gone
async def create_finetune(request: Request) -> Response:
    service = service_of(request)
    body = await read_json(request)
    model, name = body.get("model"), body.get("name")
    if not isinstance(model, str) or not isinstance(name, str):
        raise bad_input('a fine-tune needs "model" and "name" strings, for example '
                        '{"model": "@cf/google/gemma-2b-it-lora", "name": "my-adapter"}')
    service.check_model(model)
    description, public = body.get("description") or "", body.get("public", False)
    if not isinstance(description, str) or not isinstance(public, bool):
        raise bad_input('"description" must be a string and "public" a boolean')
    if name in service.adapter_names():
        raise name_conflict(f"{name!r} is the name of an adapter this server loaded at start (--adapter or "
                            f"--fuse), which lora={name!r} serves: pick another name")
    finetune = await _in_store(service.store.create, model, name, description, public)
    return JSONResponse(success(finetune.to_dict()))


async def _in_store(fn: Any, *args: Any, named: str = "") -> Any:
    """Run a store call off the event loop; its refusals become API errors (`named`: the fine-tune as
    the client named it, for a 404 when it vanished meanwhile, deleted by a concurrent request)."""
    try:
        return await asyncio.to_thread(fn, *args)
    except FinetuneNotFound:
        raise finetune_not_found(named) from None
    except FinetuneExists as exc:
        raise name_conflict(str(exc)) from None
    except AssetTooLarge as exc:
        raise request_too_large(str(exc)) from None
    except (AssetError, FinetuneError) as exc:
        raise bad_input(str(exc)) from None
    except Exception as exc:
        if is_disk_full(exc):
            raise storage_full(exc) from None
        raise


async def list_finetunes(request: Request) -> Response:
    finetunes = await asyncio.to_thread(service_of(request).store.list, False)
    return JSONResponse(success([f.to_dict() for f in finetunes]))


async def list_public_finetunes(request: Request) -> Response:
    """Public fine-tunes, with the `limit`, `offset` and `orderBy` query parameters of Cloudflare's API."""
    limit, offset = _count_query(request, "limit", 1), _count_query(request, "offset", 0) or 0
    order_by = request.query_params.get("orderBy")
    if order_by is not None and order_by not in ORDER_COLUMNS:
        raise bad_input(f"orderBy={order_by!r:.80}: order by one of {', '.join(ORDER_COLUMNS)}")
    rows = [f.to_dict() for f in await asyncio.to_thread(service_of(request).store.list, True)]
    if order_by is not None:
        rows.sort(key=lambda row: str(row[order_by]))
    return JSONResponse(success(rows[offset:None if limit is None else offset + limit]))


def _count_query(request: Request, name: str, least: int) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        number = float(text)  # the cloudflare SDK sends limit and offset as floats: 5.0
    except ValueError:
        number = float("nan")
    if not number.is_integer() or number < least:
        raise bad_input(f"{name}={text!r:.40}: use a whole number of at least {least}")
    return int(number)


async def get_finetune(request: Request) -> Response:
    service = service_of(request)
    finetune = await asyncio.to_thread(service.find_finetune, request.path_params["finetune"])
    return JSONResponse(success({**finetune.to_dict(), "files": list(finetune.files)}))


async def delete_finetune(request: Request) -> Response:
    service = service_of(request)
    finetune = await asyncio.to_thread(service.find_finetune, request.path_params["finetune"])
    await _in_store(service.store.delete, finetune.id, named=request.path_params["finetune"])
    await service.on_engine(lambda: service.forget_finetune(finetune.id))
    return JSONResponse(success(finetune.to_dict()))


@unless_gone
async def upload_asset(request: Request) -> Response:
    service = service_of(request)
    finetune = await asyncio.to_thread(service.find_finetune, request.path_params["finetune"])
    file_name, upload = await _read_asset_form(request, service.settings.max_upload_bytes)
    try:
        finetune = await _in_store(service.store.add_asset, finetune.id, file_name, upload.file,
                                   named=request.path_params["finetune"])
    finally:
        await upload.close()
    return JSONResponse(success({**finetune.to_dict(), "files": list(finetune.files)}))


async def _read_asset_form(request: Request, limit: int) -> tuple[str, UploadFile]:
    """The form's file_name and file; the body is refused as soon as it passes the limit, even unannounced."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + FORM_OVERHEAD_BYTES:
        raise request_too_large(f"the upload is {declared} bytes and a fine-tune file may be at most {limit} "
                                "bytes: upload a smaller adapter (a lower rank), or start the server with a "
                                "larger --max-upload-mb")
    limit += FORM_OVERHEAD_BYTES
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_input("upload the asset as multipart/form-data with fields file_name and file")
    parser = MultiPartParser(request.headers, _limited(request.stream(), limit), max_files=1, max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise bad_input(f"the multipart form cannot be read ({exc.message}): send the fields file_name and "
                        "file, as curl -F does") from None
    file_name, upload = form.get("file_name"), form.get("file")
    if not isinstance(file_name, str) or not isinstance(upload, UploadFile):
        await form.close()
        raise bad_input("the form needs a file_name field (adapter_config.json or adapter_model.safetensors) "
                        "and a file field holding the file")
    return file_name, upload


async def _limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused with 3006 as soon as they pass `limit` bytes; a client that leaves
    part way is ClientGone (an empty 499), not a server error."""
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            yield chunk
    except ClientDisconnect:
        raise ClientGone() from None


def routes() -> list[BaseRoute]:
    return [
        Route(f"{PREFIX}/run/{{model:path}}", run, methods=["POST"]),
        Route(f"{PREFIX}/finetunes", create_finetune, methods=["POST"]),
        Route(f"{PREFIX}/finetunes", list_finetunes, methods=["GET"]),
        Route(f"{PREFIX}/finetunes/public", list_public_finetunes, methods=["GET"]),
        Route(f"{PREFIX}/finetunes/{{finetune}}", get_finetune, methods=["GET"]),
        Route(f"{PREFIX}/finetunes/{{finetune}}", delete_finetune, methods=["DELETE"]),
        Route(f"{PREFIX}/finetunes/{{finetune}}/finetune-assets", upload_asset, methods=["POST"]),
    ]
