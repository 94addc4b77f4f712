"""The browser playground at `GET /`, end to end: headless Chromium against the real server.

Chromium is Debian's (`apt-get install chromium`, at /usr/bin/chromium, or the path in
MLX_GEMMA_CHROMIUM), driven by Playwright's Python package (`pip install playwright`; no browser
download). Without either the whole module is skipped, with a reason naming what is missing.

The page's streamed replies must equal the API's greedy text for the same request, with the
base and with a fine-tune uploaded through the page's own form; errors must show the envelope's
code and message; the page must work from the keyboard and fit 1280x800 and 390x844 screens.
Screenshots are kept in tests/artifacts/playground/ (ignored by git).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import mlx_gemma
from mlx_gemma.server.app import build_app
from mlx_gemma.server.schema import failure
from mlx_gemma.server.service import Settings
from mlx_gemma.server.workers_ai import sse, until_error

from conftest import FIXTURES, ROOT
from serving import serving

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    pytest.skip("SKIPPED LOUDLY: Playwright's Python package is missing, so the playground's browser test "
                "cannot run: `pip install playwright` (it drives the system Chromium; no browser download)",
                allow_module_level=True)

CHROMIUM = Path(os.environ.get("MLX_GEMMA_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(f"SKIPPED LOUDLY: no Chromium at {CHROMIUM}, so the playground's browser test cannot run: "
                "`apt-get install chromium` (or set MLX_GEMMA_CHROMIUM to a Chromium or Chrome binary)",
                allow_module_level=True)

ADAPTER = FIXTURES / "adapters" / "all7_r8"
ARTIFACTS = ROOT / "tests" / "artifacts" / "playground"
MODEL = "@cf/google/gemma-2b-it-lora"
API = "/client/v4/accounts/playground/ai"
TOKEN = "playground-token"
SYSTEM, MESSAGE = "Answer briefly.", "Hello"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": MESSAGE}]
GREEDY = {"temperature": 0, "max_tokens": 16}
PENALTIES = {"repetition_penalty": 1.1, "frequency_penalty": 0.3, "presence_penalty": 0.5}
WRONG_TOKEN = "Authentication error: the bearer token is not the server's --api-token"

expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir, adapters={"all7": str(ADAPTER)})


@pytest.fixture(scope="module")
def app(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A runtime of its own, so uploaded fine-tunes stay out of the session runtime."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("playground-data"), api_token=TOKEN)
    return build_app(mlx_gemma.load(tiny_dir), settings)


@pytest.fixture(scope="module")
def url(app: Any) -> Iterator[str]:
    with serving(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, url: str) -> Iterator[Page]:
    """A fresh tab on the playground at 1280x800."""
    with open_page(browser, url, 1280, 800) as tab:
        yield tab


@contextlib.contextmanager
def open_page(browser: Browser, url: str, width: int, height: int,
              requested: list[str] | None = None) -> Iterator[Page]:
    """A fresh tab (own sessionStorage) on the playground; no script error may happen in it."""
    context = browser.new_context(viewport={"width": width, "height": height})
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    if requested is not None:
        tab.on("request", lambda request: requested.append(request.url))
    tab.goto(url)
    yield tab
    context.close()
    assert script_errors == [], "the page's script failed"


# --- helpers ---------------------------------------------------------------------------------

def use_token(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.press("#token", "Enter")


def wait_for_list(page: Page) -> None:
    expect(page.locator("#list-status")).to_have_text(re.compile(r"fine-tune"))


def fill_request(page: Page, parameters: dict[str, float]) -> None:
    page.fill("#system", SYSTEM)
    page.fill("#message", MESSAGE)
    for name, value in parameters.items():
        page.fill(f"#{name}", str(value))


def wait_for_reply(page: Page) -> str:
    expect(page.locator("#run-status")).to_have_attribute("data-state", "done")
    return page.locator("#reply").text_content() or ""


def api_text(url: str, body: dict[str, Any], token: str = TOKEN) -> str:
    """The server's own answer to the same request, not streamed."""
    response = httpx.post(f"{url}{API}/run/{MODEL}", json={k: v for k, v in body.items() if k != "stream"},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return response.json()["result"]["response"]


def api_error_message(response: httpx.Response) -> str:
    assert response.json()["success"] is False
    [error] = response.json()["errors"]
    return f"Error {error['code']}: {error['message']}"


def threading_run(make_coroutine: Any) -> Any:
    """asyncio.run in a thread of its own."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


def focused_id(page: Page) -> str:
    return page.evaluate("document.activeElement.id")


# --- the page itself -------------------------------------------------------------------------

def test_page_and_its_files_need_no_token_and_load_nothing_from_elsewhere(browser: Browser, url: str) -> None:
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{url}/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert httpx.get(f"{url}/playground/secret.txt").status_code == 401
    missing = httpx.get(f"{url}/playground/secret.txt", headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == 7000
    assert httpx.get(f"{url}{API}/finetunes").status_code == 401, "the API still needs the token"
    requested: list[str] = []
    with open_page(browser, url, 1280, 800, requested) as tab:
        use_token(tab, TOKEN)
        wait_for_list(tab)
        assert tab.title() == "mlx-gemma playground"
        expect(tab.locator("#server-status")).to_contain_text(f"as {MODEL}")
    assert f"{url}/playground/app.js" in requested and f"{url}/playground/playground.css" in requested
    assert all(address.startswith(f"{url}/") for address in requested), requested


def test_keyboard_run_streams_the_greedy_reply(page: Page, url: str, reference: mlx_gemma.Runtime) -> None:
    page.keyboard.press("Tab")
    assert focused_id(page) == "token", "the token field comes first in the tab order"
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    wait_for_list(page)
    assert page.evaluate("sessionStorage.getItem('mlx-gemma-playground-token')") == TOKEN
    parameters = {**GREEDY, **PENALTIES, "top_k": 40, "top_p": 0.9, "seed": 7}
    fill_request(page, parameters)
    page.focus("#system")
    page.keyboard.press("Tab")
    assert focused_id(page) == "message"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid", "focus is visible"
    with page.expect_response(f"**{API}/run/**") as answer:
        page.keyboard.press("Enter")
    sent = answer.value.request.post_data_json
    assert sent == {"messages": MESSAGES, **parameters, "stream": True}
    assert answer.value.headers["content-type"].startswith("text/event-stream")
    expected = reference.generate(messages=MESSAGES, **GREEDY, **PENALTIES)
    assert wait_for_reply(page) == expected.text == api_text(url, sent)
    usage = expected.usage
    expect(page.locator("#run-stats")).to_contain_text(
        f"prompt_tokens {usage.prompt_tokens}, completion_tokens {usage.completion_tokens}, "
        f"total_tokens {usage.total_tokens}")
    expect(page.locator("#run-stats")).to_contain_text("tokens/s")


def test_enter_keys_in_the_message_box_and_on_send(page: Page, reference: mlx_gemma.Runtime) -> None:
    use_token(page, TOKEN)
    fill_request(page, GREEDY)
    runs: list[str] = []
    page.on("request", lambda request: runs.append(request.url) if "/ai/run/" in request.url else None)
    page.focus("#message")
    page.keyboard.press("End")
    page.keyboard.press("Shift+Enter")
    assert page.input_value("#message") == MESSAGE + "\n" and runs == [], "Shift+Enter is a new line"
    page.fill("#message", MESSAGE)
    page.focus("#message")
    page.keyboard.press("Tab")
    assert focused_id(page) == "send"
    page.keyboard.press("Enter")
    expected = reference.generate(messages=MESSAGES, **GREEDY).text
    assert wait_for_reply(page) == expected
    page.focus("#system")
    with page.expect_response(f"**{API}/run/**"):
        page.keyboard.press("Control+Enter")
    assert wait_for_reply(page) == expected
    assert len(runs) == 2, "Enter on Send and Ctrl+Enter in the system prompt each sent one request"


def test_raw_prompt_mode_sends_raw_true(page: Page, url: str) -> None:
    use_token(page, TOKEN)
    page.check("input[name=mode][value=raw]")
    expect(page.locator("#message")).to_be_hidden()
    raw_prompt = "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    page.fill("#prompt", raw_prompt)
    for name, value in GREEDY.items():
        page.fill(f"#{name}", str(value))
    with page.expect_request(f"**{API}/run/**") as request:
        page.press("#prompt", "Control+Enter")
    assert request.value.post_data_json == {"prompt": raw_prompt, "raw": True, **GREEDY, "stream": True}
    assert wait_for_reply(page) == api_text(url, request.value.post_data_json)


def test_stop_ends_the_generation_on_the_server(page: Page, app: Any) -> None:
    engine = app.state.service.runtime.engine
    use_token(page, TOKEN)
    fill_request(page, {"temperature": 0, "max_tokens": 100000})
    page.click("#send")
    expect(page.locator("#run-status")).to_have_text("Streaming…")
    page.click("#stop")
    expect(page.locator("#run-status")).to_have_attribute("data-state", "stopped")
    expect(page.locator("#stop")).to_be_disabled()
    assert focused_id(page) == "send", "focus leaves the disabled Stop button for Send"
    for _ in range(100):
        if engine.active == 0:
            break
        page.wait_for_timeout(50)
    assert engine.active == 0, "the engine still runs the abandoned request"


# --- fine-tunes ------------------------------------------------------------------------------

def upload(page: Page, name: str) -> None:
    page.fill("#ft-name", name)
    page.fill("#ft-description", "uploaded from the playground")
    page.set_input_files("#ft-config", ADAPTER / "adapter_config.json")
    page.set_input_files("#ft-weights", ADAPTER / "adapter_model.safetensors")
    page.click("#upload")


def test_upload_select_run_and_delete_a_finetune(page: Page, url: str, reference: mlx_gemma.Runtime) -> None:
    use_token(page, TOKEN)
    wait_for_list(page)
    upload(page, "pirate")
    expect(page.locator("#upload-status")).to_have_text("Uploaded pirate: choose it under Model to run it.")
    row = page.locator("#finetune-list li[data-name=pirate]")
    expect(row).to_contain_text("ready")
    expect(row).to_contain_text("uploaded from the playground")
    page.select_option("#lora", label="pirate")
    fill_request(page, GREEDY)
    page.click("#send")
    adapted = reference.generate(messages=MESSAGES, lora="all7", **GREEDY).text
    assert wait_for_reply(page) == adapted
    assert adapted != reference.generate(messages=MESSAGES, **GREEDY).text, "the adapter changes the text"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    duplicate = httpx.post(f"{url}{API}/finetunes", json={"model": MODEL, "name": "pirate"}, headers=auth)
    upload(page, "pirate")
    expect(page.locator("#upload-error")).to_contain_text(f"The server answered HTTP {duplicate.status_code}.")
    expect(page.locator("#upload-error")).to_contain_text(api_error_message(duplicate))

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button[aria-label='Delete pirate']")
    expect(row).to_have_count(0)
    expect(page.locator("#list-status")).to_have_text("Deleted pirate.")
    expect(page.locator("#lora option", has_text="pirate")).to_have_count(0)
    assert httpx.get(f"{url}{API}/finetunes", headers=auth).json()["result"] == []


def test_a_refused_file_shows_the_server_message(page: Page) -> None:
    use_token(page, TOKEN)
    page.fill("#ft-name", "broken")
    page.set_input_files("#ft-config", ADAPTER / "adapter_config.json")
    page.set_input_files("#ft-weights", ADAPTER / "adapter_config.json")  # not a safetensors file
    page.click("#upload")
    expect(page.locator("#upload-status")).to_have_text(
        "broken was created but lacks a file: delete it and upload again.")
    expect(page.locator("#upload-error")).to_contain_text("The server answered HTTP 400.")
    expect(page.locator("#upload-error")).to_contain_text(
        "Error 5006: AiError: Bad input: adapter_model.safetensors for fine-tune 'broken' refused: "
        "adapter_model.safetensors is not a valid safetensors file")
    row = page.locator("#finetune-list li[data-name=broken]")
    expect(row).to_contain_text("missing files")
    expect(page.locator("#lora option", has_text="broken")).to_have_count(0)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button[aria-label='Delete broken']")
    expect(row).to_have_count(0)


# --- errors ----------------------------------------------------------------------------------

def test_wrong_token_shows_the_401_envelope(page: Page, url: str) -> None:
    answer = httpx.post(f"{url}{API}/run/{MODEL}", json={"prompt": "Hi"}, headers={"Authorization": "Bearer nope"})
    assert answer.status_code == 401 and api_error_message(answer) == f"Error 10000: {WRONG_TOKEN}"
    use_token(page, "nope")
    expect(page.locator("#list-error")).to_contain_text(f"Error 10000: {WRONG_TOKEN}")
    fill_request(page, GREEDY)
    page.click("#send")
    expect(page.locator("#run-status")).to_have_attribute("data-state", "error")
    expect(page.locator("#run-error")).to_contain_text("The server answered HTTP 401.")
    expect(page.locator("#run-error")).to_contain_text(f"Error 10000: {WRONG_TOKEN}")
    expect(page.locator("#reply")).to_have_text("")


def test_a_stopped_server_is_reported_as_unreachable(browser: Browser, app: Any) -> None:
    with contextlib.ExitStack() as tabs:
        with serving(app) as short_lived:
            tab = tabs.enter_context(open_page(browser, short_lived, 1280, 800))
            use_token(tab, TOKEN)
            wait_for_list(tab)
        fill_request(tab, GREEDY)  # the server has stopped; the page is still open
        tab.click("#send")
        expect(tab.locator("#run-status")).to_have_attribute("data-state", "error")
        expect(tab.locator("#run-error")).to_contain_text(
            f"Cannot reach the server at {short_lived}: is mlx-gemma serve still running?")
        tab.click("#refresh")
        expect(tab.locator("#list-error")).to_contain_text(f"Cannot reach the server at {short_lived}")


# --- layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("width", "height"), [(1280, 800), (390, 844)])
def test_fits_desktop_and_phone_screens(browser: Browser, url: str, width: int, height: int) -> None:
    with open_page(browser, url, width, height) as tab:
        use_token(tab, TOKEN)
        fill_request(tab, GREEDY)
        tab.click("#send")
        wait_for_reply(tab)
        assert tab.evaluate("document.documentElement.scrollWidth") <= width, "no sideways scrolling"
        expect(tab.locator("#reply")).to_be_in_viewport()
        tab.evaluate("window.scrollTo(0, 0)")
        if width >= 1280:
            expect(tab.locator("#send")).to_be_in_viewport()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for full_page in (False, True):
            shot = ARTIFACTS / f"playground-{width}x{height}{'-full' if full_page else ''}.png"
            tab.screenshot(path=str(shot), full_page=full_page)
            print(f"screenshot: {shot}")


def test_a_stream_that_fails_part_way_shows_the_error_event(page: Page) -> None:
    """The server's own bytes for a stream that fails after its first piece (the status was 200 by then)."""
    async def failing() -> AsyncIterator[bytes]:
        yield sse({"response": "Hello"})
        raise RuntimeError("the engine stopped")

    async def collect() -> bytes:
        return b"".join([event async for event in until_error(failing(), lambda e: failure(e.code, e.message))])

    body = threading_run(collect)  # Playwright's own event loop runs in this thread
    page.route(f"**{API}/run/**", lambda route: route.fulfill(status=200, body=body,
                                                               headers={"content-type": "text/event-stream"}))
    use_token(page, TOKEN)
    fill_request(page, GREEDY)
    page.click("#send")
    expect(page.locator("#run-status")).to_have_attribute("data-state", "error")
    expect(page.locator("#reply")).to_have_text("Hello")
    expect(page.locator("#run-error")).to_contain_text("The reply stream ended with an error.")
    expect(page.locator("#run-error")).to_contain_text(
        "Error 3043: AiError: Internal server error: RuntimeError: the engine stopped")
