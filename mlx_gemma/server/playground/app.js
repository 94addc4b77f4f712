/*
 * mlx-gemma playground: what index.html does. A plain script: no build step, no imports.
 *
 * Contract:
 * - Every request goes to this page's own server: GET /healthz (the model name), and the
 *   Workers AI routes under /client/v4/accounts/playground/ai/: run/{model} with
 *   "stream": true, finetunes (create, list, delete), finetunes/{id}/finetune-assets (one
 *   multipart upload per file) and v1/models (which fine-tunes are complete).
 * - The token field's value is kept in sessionStorage only (this tab) and sent as
 *   `Authorization: Bearer <token>` on every API call.
 * - A reply streams in from the server-sent events `data: {"response": "..."}`, then
 *   `data: {"response": "", "usage": {...}}`, then `data: [DONE]`; when it ends the page shows
 *   the usage and tokens/s. Closing the stream (Stop) ends the generation on the server.
 * - A failed call shows the HTTP status and each {code, message} of the error envelope as the
 *   server sent it; a call that cannot reach the server says so. A stream that fails part way
 *   ends with an error envelope as an event (then [DONE]): the page shows it the same way.
 */
"use strict";

(() => {
  const API = "/client/v4/accounts/playground/ai";
  const TOKEN_KEY = "mlx-gemma-playground-token";
  const PARAMETERS = ["temperature", "max_tokens", "top_p", "top_k", "seed",
    "repetition_penalty", "frequency_penalty", "presence_penalty"];
  const ASSET_INPUTS = [["ft-config", "adapter_config.json"], ["ft-weights", "adapter_model.safetensors"]];
  const state = { model: "@cf/google/gemma-2b-it-lora", controller: null, listing: 0 };

  const byId = (id) => document.getElementById(id);

  /* --- talking to the server ------------------------------------------------------------ */

  class ApiFailure extends Error {
    constructor(status, errors) {
      super(errors.map((error) => error.message).join("; "));
      this.status = status;
      this.errors = errors;
    }
  }

  class Unreachable extends Error {}

  /* An error envelope sent as an event: the status line (200) had gone out before the failure. */
  class StreamFailure extends ApiFailure {}

  function authorization() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function send(method, path, options = {}) {
    let response;
    try {
      response = await fetch(path, { method, body: options.body, signal: options.signal,
        headers: { ...authorization(), ...options.headers } });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new Unreachable(error.message);
    }
    if (!response.ok) throw await failureOf(response);
    return response;
  }

  async function callApi(method, path, json) {
    const options = json === undefined ? {}
      : { headers: { "content-type": "application/json" }, body: JSON.stringify(json) };
    const body = await (await send(method, path, options)).json();
    return body.result === undefined ? body : body.result;
  }

  async function failureOf(response) {
    const text = await response.text().catch(() => "");
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
    return new ApiFailure(response.status, errorsOf(body, text || response.statusText));
  }

  function errorsOf(body, fallback) {
    if (body && Array.isArray(body.errors) && body.errors.length) return body.errors;  // Workers AI
    if (body && body.error && typeof body.error === "object") return [body.error];     // OpenAI
    return [{ code: null, message: fallback }];
  }

  /* --- showing errors and status -------------------------------------------------------- */

  function showError(box, error) {
    box.replaceChildren(...errorLines(error));
    box.hidden = false;
  }

  function hideError(box) {
    box.hidden = true;
    box.replaceChildren();
  }

  function errorLines(error) {
    if (error instanceof ApiFailure) {
      const lines = error.errors.map((item) => line(item.code === null || item.code === undefined
        ? "" : `Error ${item.code}: `, String(item.message)));
      const first = error instanceof StreamFailure ? "The reply stream ended with an error."
        : `The server answered HTTP ${error.status}.`;
      return [line("", first), ...lines];
    }
    if (error instanceof Unreachable) {
      return [line("", `Cannot reach the server at ${location.origin}: is mlx-gemma serve still running? `
        + `(${error.message})`)];
    }
    return [line("Unexpected error: ", error.message || String(error))];
  }

  function line(lead, text) {
    const paragraph = document.createElement("p");
    if (lead) {
      const strong = document.createElement("strong");
      strong.textContent = lead;
      paragraph.append(strong);
    }
    paragraph.append(text);
    return paragraph;
  }

  function setStatus(id, text, runState) {
    const element = byId(id);
    element.textContent = text;
    if (runState) element.dataset.state = runState;
  }

  /* --- token ---------------------------------------------------------------------------- */

  function saveToken(event) {
    event.preventDefault();
    const token = byId("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    refresh();
  }

  /* --- the server, its fine-tunes and the model choice ---------------------------------- */

  async function refresh() {
    await loadHealth();
    await loadFinetunes();
  }

  async function loadHealth() {
    try {
      const health = await (await send("GET", "/healthz")).json();
      state.model = health.served[0];
      setStatus("server-status", `Serving ${health.model} as ${state.model}.`);
    } catch (error) {
      setStatus("server-status", error instanceof Unreachable
        ? `Cannot reach the server at ${location.origin}.` : `The server answered: ${error.message}`);
    }
  }

  async function loadFinetunes() {
    const listing = ++state.listing;  // only the latest listing is shown (a token change starts a new one)
    try {
      const [finetunes, models] = await Promise.all([
        callApi("GET", `${API}/finetunes`), callApi("GET", `${API}/v1/models`)]);
      if (listing !== state.listing) return;
      hideError(byId("list-error"));
      const complete = new Set(models.data.filter((row) => row.owned_by === "mlx-gemma:finetune")
        .map((row) => row.id));
      const adapters = models.data.filter((row) => row.owned_by === "mlx-gemma:adapter").map((row) => row.id);
      renderList(finetunes, complete);
      renderChoices(finetunes.filter((finetune) => complete.has(finetune.name)), adapters);
    } catch (error) {
      if (listing !== state.listing) return;
      setStatus("list-status", "");
      showError(byId("list-error"), error);
    }
  }

  function renderChoices(finetunes, adapters) {
    const select = byId("lora");
    const chosen = select.value;
    const base = new Option("Base model (no LoRA)", "");
    const groups = [group("Fine-tunes", finetunes.map((f) => new Option(f.name, f.id))),
      group("Adapters (--adapter)", adapters.map((name) => new Option(name, name)))];
    select.replaceChildren(base, ...groups.filter((element) => element.children.length));
    select.value = [...select.options].some((option) => option.value === chosen) ? chosen : "";
  }

  function group(label, options) {
    const element = document.createElement("optgroup");
    element.label = label;
    element.append(...options);
    return element;
  }

  function renderList(finetunes, complete) {
    byId("finetune-list").replaceChildren(...finetunes.map((f) => listItem(f, complete.has(f.name))));
    setStatus("list-status", finetunes.length ? `${finetunes.length} fine-tune(s).`
      : "No fine-tunes yet: upload one above.");
  }

  function listItem(finetune, isComplete) {
    const item = document.createElement("li");
    item.dataset.name = finetune.name;
    const title = document.createElement("p");
    title.className = "finetune-title";
    title.append(textElement("strong", finetune.name),
      badge(isComplete ? "ready" : "missing files", isComplete ? "ok" : "warn"));
    if (finetune.public) title.append(badge("public", "info"));
    item.append(title);
    if (finetune.description) item.append(textElement("p", finetune.description));
    item.append(meta(finetune), itemActions(finetune, isComplete));
    return item;
  }

  function textElement(tag, text, className) {
    const element = document.createElement(tag);
    element.textContent = text;
    if (className) element.className = className;
    return element;
  }

  function badge(text, kind) {
    return textElement("span", text, `badge ${kind}`);
  }

  function meta(finetune) {
    const paragraph = textElement("p", "", "meta");
    paragraph.append("id ", textElement("code", finetune.id), ` · created ${finetune.created_at}`);
    return paragraph;
  }

  function itemActions(finetune, isComplete) {
    const actions = textElement("div", "", "item-actions");
    if (isComplete) actions.append(button("Use", `Use ${finetune.name} in Run`, () => useFinetune(finetune)));
    actions.append(button("Delete", `Delete ${finetune.name}`, () => deleteFinetune(finetune), "danger"));
    return actions;
  }

  function button(text, label, onClick, className) {
    const element = textElement("button", text, className);
    element.type = "button";
    element.setAttribute("aria-label", label);
    element.addEventListener("click", onClick);
    return element;
  }

  function useFinetune(finetune) {
    byId("lora").value = finetune.id;
    focusInput();
  }

  function focusInput() {
    byId(inputMode() === "raw" ? "prompt" : "message").focus();
  }

  async function deleteFinetune(finetune) {
    if (!window.confirm(`Delete the fine-tune "${finetune.name}" and its files?`)) return;
    hideError(byId("list-error"));
    try {
      await callApi("DELETE", `${API}/finetunes/${encodeURIComponent(finetune.id)}`);
      await loadFinetunes();
      setStatus("list-status", `Deleted ${finetune.name}.`);
      byId("refresh").focus();
    } catch (error) {
      showError(byId("list-error"), error);
    }
  }

  /* --- uploading a fine-tune ------------------------------------------------------------ */

  async function upload(event) {
    event.preventDefault();
    const form = event.target;
    const name = byId("ft-name").value.trim();
    hideError(byId("upload-error"));
    byId("upload").disabled = true;
    let created = null;
    try {
      created = await createFinetune(name);
      await uploadAssets(created);
      setStatus("upload-status", `Uploaded ${name}: choose it under Model to run it.`);
      form.reset();
    } catch (error) {
      setStatus("upload-status", created ? `${name} was created but lacks a file: delete it and upload again.`
        : "The upload failed.");
      showError(byId("upload-error"), error);
    } finally {
      byId("upload").disabled = false;
      await loadFinetunes();
    }
  }

  function createFinetune(name) {
    setStatus("upload-status", `Creating ${name}…`);
    return callApi("POST", `${API}/finetunes`, { model: state.model, name,
      description: byId("ft-description").value, public: byId("ft-public").checked });
  }

  async function uploadAssets(finetune) {
    for (const [inputId, fileName] of ASSET_INPUTS) {
      setStatus("upload-status", `Uploading ${fileName}…`);
      const form = new FormData();
      form.append("file_name", fileName);
      form.append("file", byId(inputId).files[0], fileName);
      const path = `${API}/finetunes/${encodeURIComponent(finetune.id)}/finetune-assets`;
      await send("POST", path, { body: form });
    }
  }

  /* --- running a request ---------------------------------------------------------------- */

  function inputMode() {
    return document.querySelector('input[name="mode"]:checked').value;
  }

  function showMode() {
    const raw = inputMode() === "raw";
    for (const [id, shown] of [["raw-input", raw], ["messages-input", !raw]]) {
      byId(id).hidden = !shown;
      byId(id).disabled = !shown;
    }
  }

  function runBody() {
    const body = inputMode() === "raw"
      ? { prompt: byId("prompt").value, raw: true } : { messages: messages() };
    for (const name of PARAMETERS) {
      const value = byId(name).valueAsNumber;
      if (!Number.isNaN(value)) body[name] = value;
    }
    if (byId("lora").value) body.lora = byId("lora").value;
    body.stream = true;
    return body;
  }

  function messages() {
    const system = byId("system").value.trim();
    const message = { role: "user", content: byId("message").value };
    return system ? [{ role: "system", content: system }, message] : [message];
  }

  async function run(event) {
    event.preventDefault();
    if (state.controller) return;
    const body = runBody();
    state.controller = new AbortController();
    startRun();
    const started = performance.now();
    try {
      const response = await send("POST", `${API}/run/${state.model}`, { signal: state.controller.signal,
        headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      finishRun(await readEvents(response, started), started);
    } catch (error) {
      failRun(error);
    } finally {
      state.controller = null;
      setRunning(false);
    }
  }

  function startRun() {
    byId("reply").replaceChildren();
    byId("run-stats").hidden = true;
    hideError(byId("run-error"));
    setRunning(true);
    setStatus("run-status", "Waiting for the first piece…", "running");
    byId("reply").scrollIntoView({ block: "nearest" });  // on a phone the reply is below the form
  }

  function setRunning(running) {
    const stop = byId("stop");
    if (!running && document.activeElement === stop) byId("send").focus();
    stop.disabled = !running;
    byId("reply").setAttribute("aria-busy", String(running));
  }

  async function readEvents(response, started) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const outcome = { usage: null, done: false, failure: null, firstAt: null, started };
    let buffer = "";
    for (;;) {
      const { value, done } = await readChunk(reader);
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      events.forEach((event) => takeEvent(event, outcome));
    }
    return outcome;
  }

  async function readChunk(reader) {
    try {
      return await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new Unreachable(`the connection broke before the reply ended: ${error.message}`);
    }
  }

  function takeEvent(event, outcome) {
    for (const row of event.split(/\r?\n/)) {
      if (!row.startsWith("data:")) continue;
      const data = row.slice(5).trim();
      if (data === "[DONE]") {
        outcome.done = true;
        continue;
      }
      const piece = JSON.parse(data);
      if (piece.success === false) outcome.failure = new StreamFailure(200, piece.errors || []);
      if (piece.response) appendText(piece.response, outcome);
      if (piece.usage) outcome.usage = piece.usage;
    }
  }

  function appendText(text, outcome) {
    if (outcome.firstAt === null) {
      outcome.firstAt = performance.now();
      setStatus("run-status", "Streaming…", "running");
    }
    const reply = byId("reply");
    reply.append(text);
    reply.scrollTop = reply.scrollHeight;
  }

  function finishRun(outcome, started) {
    const seconds = (performance.now() - started) / 1000;
    if (outcome.failure) {
      setStatus("run-status", "The reply failed part way: what came before the error is shown.", "error");
      showError(byId("run-error"), outcome.failure);
      return;
    }
    if (!outcome.done) {
      setStatus("run-status", "The stream ended before [DONE]: the reply may be cut short.", "error");
      return;
    }
    setStatus("run-status", "Done.", "done");
    if (outcome.usage) showStats(outcome, seconds);
  }

  function showStats(outcome, seconds) {
    const usage = outcome.usage;
    const rate = (usage.completion_tokens / seconds).toFixed(1);
    const first = outcome.firstAt === null ? ""
      : `; first text after ${formatSeconds((outcome.firstAt - outcome.started) / 1000)}`;
    const stats = byId("run-stats");
    stats.textContent = `${usage.completion_tokens} tokens in ${formatSeconds(seconds)}: ${rate} tokens/s${first}. `
      + `Usage: prompt_tokens ${usage.prompt_tokens}, completion_tokens ${usage.completion_tokens}, `
      + `total_tokens ${usage.total_tokens}.`;
    stats.hidden = false;
  }

  function formatSeconds(seconds) {
    return `${seconds.toFixed(2)} s`;
  }

  function failRun(error) {
    if (error.name === "AbortError") {
      setStatus("run-status", "Stopped: the server ended the generation.", "stopped");
      return;
    }
    const summary = error instanceof Unreachable ? "The server could not be reached." : "The request failed.";
    setStatus("run-status", summary, "error");
    showError(byId("run-error"), error);
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  /* --- keyboard ------------------------------------------------------------------------- */

  function sendOnEnter(event) {
    if (event.key !== "Enter" || event.isComposing || event.target.tagName !== "TEXTAREA") return;
    const plainEnterSends = event.target.id === "message" && !event.shiftKey && !event.altKey;
    if (event.ctrlKey || event.metaKey || plainEnterSends) {
      event.preventDefault();
      byId("run-form").requestSubmit();
    }
  }

  /* --- start ---------------------------------------------------------------------------- */

  function start() {
    byId("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
    byId("token-form").addEventListener("submit", saveToken);
    byId("run-form").addEventListener("submit", run);
    byId("run-form").addEventListener("keydown", sendOnEnter);
    for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", showMode);
    byId("stop").addEventListener("click", stop);
    byId("upload-form").addEventListener("submit", upload);
    byId("refresh").addEventListener("click", loadFinetunes);
    showMode();
    refresh();
  }

  start();
})();
