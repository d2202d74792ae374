// The chat page of vlmamba-serve. It only talks to this server's OpenAI-compatible API
// (/v1/models and /v1/chat/completions), exactly as any other client would.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model-name"), newChat: $("new-chat"), keyButton: $("key-button"),
  scroller: $("scroller"), transcript: $("transcript"), empty: $("empty"),
  keyForm: $("key-form"), key: $("api-key"), error: $("error"),
  composer: $("composer"), question: $("question"), send: $("send"), stop: $("stop"),
  file: $("image-file"), url: $("image-url"), attachment: $("attachment"), preview: $("preview"),
  attachmentName: $("attachment-name"), removeImage: $("remove-image"),
  temperature: $("temperature"), maxTokens: $("max-tokens"),
};
const KEY = "vlmamba.apiKey"; // in sessionStorage: the key lives as long as the tab, never on disk

let messages = [];            // this conversation's OpenAI messages, resent in full every turn
let sessionId = newSessionId();
let image = null;             // {url, name}: the image attached to the next question
let modelName = "";
let inflight = null;          // AbortController of the request being streamed
let retryAfterKey = false;    // a question was refused for want of a key: resend it once one is given

function newSessionId() {
  // Not crypto.randomUUID(): it only exists in secure contexts, and the page may be opened over
  // plain http from another machine. getRandomValues works everywhere.
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function headers() {
  const key = sessionStorage.getItem(KEY);
  return { "Content-Type": "application/json", ...(key && { Authorization: "Bearer " + key }) };
}

// ---- errors, in plain words -------------------------------------------------------------
class PageError extends Error { constructor(message, status = 0) { super(message); this.status = status; } }

// The server's errors look like {"error": {"message", "type", "param", "code"}} (OpenAI's shape).
async function responseError(resp) {
  let detail = "";
  try { detail = (await resp.json()).error?.message || ""; } catch { /* not JSON: a proxy's page */ }
  const s = resp.status;
  if (s === 401) {
    return new PageError(sessionStorage.getItem(KEY)
      ? "The server did not accept this API key. Please enter the right one below."
      : "This server needs an API key. Please enter it below.", 401);
  }
  if (s === 413) return new PageError("The request is too large for the server; try a smaller image.", s);
  if (s === 429) return new PageError("The server is busy right now. Please try again in a moment.", s);
  const why = detail || `it answered with HTTP status ${s}`;
  return new PageError((s >= 500 && s !== 502 && s !== 504 ? "The server ran into a problem: "
    : "The server could not answer this: ") + why, s);
}

// fetch() rejects with a TypeError when the server cannot be reached or the connection drops.
function networkError(err, connected) {
  if (!(err instanceof TypeError)) return err;
  return new PageError(connected
    ? "The connection to the server was lost while the answer was arriving."
    : `Could not reach the server at ${location.origin}. Is "vlmamba serve" still running?`);
}

function showError(err) { // null clears it
  ui.error.textContent = err ? err.message : "";
  ui.error.hidden = !err;
  if (err?.status === 401) askForKey();
}

function askForKey() {
  ui.keyForm.hidden = ui.keyButton.hidden = false; // from now on the header offers to change the key
  ui.key.value = sessionStorage.getItem(KEY) || "";
  ui.key.focus();
}

// ---- model name and API key --------------------------------------------------------------
async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) throw await responseError(resp);
    modelName = (await resp.json()).data?.[0]?.id || "";
    ui.model.textContent = modelName || "unnamed model";
    document.title = `${ui.model.textContent} · vlmamba chat`;
    ui.keyForm.hidden = true;
    showError(null);
    return true;
  } catch (err) {
    ui.model.textContent = "not connected";
    showError(networkError(err, false));
    return false;
  }
}

ui.keyForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, ui.key.value.trim());
  // /v1/models needs the same key as chat, so it doubles as the check that the key works.
  if (await loadModel() && retryAfterKey) { retryAfterKey = false; ui.composer.requestSubmit(); }
});
ui.keyButton.addEventListener("click", () => (ui.keyForm.hidden ? askForKey() : (ui.keyForm.hidden = true)));

// ---- the image: picked, dropped, pasted or given by URL ----------------------------------
function setImage(url, name) {
  image = url ? { url, name } : null;
  ui.attachment.hidden = !image;
  ui.preview.hidden = false;
  ui.preview.src = image ? url : "";
  ui.preview.alt = image ? `Attached image: ${name}` : "";
  ui.attachmentName.textContent = image ? name : "";
}

// The API takes images inline, so a local file is sent as a data: URL.
function attachFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(new PageError(`"${file.name}" is not an image file.`)); return; }
  const reader = new FileReader();
  reader.onload = () => { showError(null); setImage(reader.result, file.name); };
  reader.onerror = () => showError(new PageError(`Could not read the file "${file.name}".`));
  reader.readAsDataURL(file);
}

ui.file.addEventListener("change", () => { attachFile(ui.file.files[0]); ui.file.value = ""; });
ui.url.addEventListener("change", () => { const u = ui.url.value.trim(); if (u) { setImage(u, u); ui.url.value = ""; } });
ui.preview.addEventListener("error", () => { if (image) ui.preview.hidden = true; }); // the server may still read it
ui.removeImage.addEventListener("click", () => setImage(null));
// Dropping a file anywhere would otherwise make the browser navigate away to it.
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) document.body.classList.remove("dragging"); });
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  const url = e.dataTransfer.getData("text/uri-list").split("\n")[0].trim(); // an image dragged from a web page
  if (e.dataTransfer.files[0]) attachFile(e.dataTransfer.files[0]); else if (url) setImage(url, url);
});
document.addEventListener("paste", (e) => {
  const file = Array.from(e.clipboardData.files).find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); attachFile(file); }
});

// ---- the transcript ----------------------------------------------------------------------
function node(tag, cls, text = "") {
  const n = document.createElement(tag);
  n.className = cls;
  n.textContent = text; // always textContent: questions and answers are never parsed as HTML
  return n;
}

function addTurn(text, img) {
  const turn = node("article", "turn"), user = node("div", "msg user");
  user.append(node("span", "visually-hidden", "You asked:"));
  if (img) {
    const thumb = Object.assign(node("img", "thumb"), { alt: `Attached image: ${img.name}` });
    // Tiny images (like the demo's 64x64 shapes) look best scaled up with crisp pixels.
    thumb.onload = () => thumb.classList.toggle("pixelated", thumb.naturalWidth < 160);
    thumb.src = img.url;
    user.append(thumb);
  }
  user.append(node("p", "text", text));
  const bot = node("div", "msg assistant"), answer = node("p", "text answer"), meta = node("p", "meta");
  bot.setAttribute("aria-busy", "true");
  bot.dataset.state = "streaming";
  answer.dataset.chunks = "0";
  bot.append(node("span", "visually-hidden", "Answer:"), answer, meta);
  turn.append(user, bot);
  ui.empty.hidden = true;
  ui.transcript.append(turn);
  scrollDown();
  return { turn, bot, answer, meta };
}

function scrollDown() { ui.scroller.scrollTop = ui.scroller.scrollHeight; }
function chip(meta, text, title, cls = "") { meta.append(Object.assign(node("span", "chip " + cls, text), { title })); }

// The numbers a newcomer wants to see: how fast the first token came, and how much of the prompt
// the server did not recompute because it resumed this conversation's saved state.
function finishTurn(t, usage, ttftMs, stopped) {
  t.bot.removeAttribute("aria-busy");
  t.bot.dataset.state = stopped ? "stopped" : "done";
  if (ttftMs !== null) {
    t.meta.dataset.ttftMs = String(Math.round(ttftMs));
    chip(t.meta, `first token in ${Math.round(ttftMs)} ms`, "Time from sending to the first token, measured in this page");
  }
  if (usage) {
    const cached = usage.prompt_tokens_details?.cached_tokens ?? 0;
    Object.assign(t.meta.dataset, { cachedTokens: cached, promptTokens: usage.prompt_tokens,
      completionTokens: usage.completion_tokens });
    chip(t.meta, `${cached} of ${usage.prompt_tokens} prompt tokens from the session cache`,
      "Prompt tokens the server resumed from its saved state of this conversation instead of recomputing",
      cached > 0 ? "cached" : "");
    chip(t.meta, `${usage.completion_tokens} tokens generated`, "Length of this answer in tokens");
  }
  if (stopped) chip(t.meta, "stopped", "You stopped this answer");
}

// ---- sending a question and streaming the answer -----------------------------------------
// Server-sent events read from fetch() (EventSource cannot POST or send an Authorization header).
// Like OpenAI, the server sends one `data: {json}` line per event and ends with `data: [DONE]`.
async function* sseEvents(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new PageError("The answer stopped early: the server closed the connection.");
    buffer += value;
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop(); // an incomplete line waits for the next read
    for (const line of lines) {
      if (!line.startsWith("data:")) continue; // blank separators and comments
      const data = line.slice(5).trim();
      if (data === "[DONE]") { reader.cancel(); return; }
      yield JSON.parse(data);
    }
  }
}

const numberOr = (input, fallback) => (Number.isFinite(input.valueAsNumber) ? input.valueAsNumber : fallback);

async function send() {
  if (ui.url.value.trim()) ui.url.dispatchEvent(new Event("change")); // a URL typed but not yet applied
  const text = ui.question.value.trim();
  if (!text) { showError(new PageError("Please type a question first.")); ui.question.focus(); return; }
  if (inflight) return;
  showError(null);
  const sent = { text, image }, convo = messages;
  convo.push({ role: "user", content: image ? [{ type: "image_url", image_url: { url: image.url } },
    { type: "text", text }] : text });
  const t = addTurn(text, image);
  setQuestion("");
  setImage(null);
  const ctl = inflight = new AbortController();
  setBusy(true);
  let answer = "", usage = null, ttftMs = null, connected = false, chunks = 0;
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: ctl.signal,
      body: JSON.stringify({
        model: modelName || undefined, messages: convo, stream: true, stream_options: { include_usage: true },
        session_id: sessionId, // pins this conversation's state in the server's session cache
        temperature: numberOr(ui.temperature, 0), max_tokens: numberOr(ui.maxTokens, 256),
      }),
    });
    connected = true;
    if (!resp.ok) throw await responseError(resp);
    for await (const event of sseEvents(resp)) {
      if (event.error) throw new PageError("The server failed while answering: " + event.error.message, 500);
      const delta = event.choices?.[0]?.delta?.content;
      if (delta) {
        ttftMs ??= performance.now() - t0;
        t.answer.textContent = answer += delta;
        t.answer.dataset.chunks = String(++chunks);
        scrollDown();
      }
      if (event.usage) usage = event.usage;
    }
    convo.push({ role: "assistant", content: answer });
    finishTurn(t, usage, ttftMs, false);
  } catch (err) {
    if (ctl.signal.reason === "new conversation") return; // the transcript is already gone
    if (ctl.signal.aborted && answer) { // stopped by the user: keep what arrived, like any chat
      convo.push({ role: "assistant", content: answer });
      finishTurn(t, usage, ttftMs, true);
      return;
    }
    // Failed (or stopped before any answer): undo the turn and give the question back to edit/resend.
    convo.pop();
    t.turn.remove();
    ui.empty.hidden = ui.transcript.querySelector(".turn") !== null;
    setQuestion(sent.text);
    setImage(sent.image?.url, sent.image?.name);
    if (!ctl.signal.aborted) {
      retryAfterKey = err.status === 401;
      showError(networkError(err, connected));
    }
  } finally {
    if (inflight === ctl) { inflight = null; setBusy(false); }
  }
}

function setBusy(busy) { ui.send.hidden = busy; ui.stop.hidden = !busy; if (!busy) ui.question.focus(); }

function setQuestion(text) { // and grow the box with the text, up to the CSS max-height
  const q = ui.question;
  if (text !== undefined) q.value = text;
  q.style.height = "auto";
  q.style.height = q.scrollHeight + q.offsetHeight - q.clientHeight + "px";
}

ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
ui.stop.addEventListener("click", () => inflight?.abort("stopped"));
ui.question.addEventListener("input", () => setQuestion());
ui.question.addEventListener("keydown", (e) => {
  // Enter sends; Shift+Enter is a new line; keys composing a character (IME) are left alone.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); ui.composer.requestSubmit(); }
});

ui.newChat.addEventListener("click", () => {
  inflight?.abort("new conversation"); // the server frees the request's slot when we disconnect
  inflight = null;
  setBusy(false);
  messages = [];
  sessionId = newSessionId();
  ui.transcript.querySelectorAll(".turn").forEach((t) => t.remove());
  ui.empty.hidden = false;
  setQuestion("");
  setImage(null);
  showError(null);
});

ui.keyButton.hidden = !sessionStorage.getItem(KEY); // only servers that asked for a key show the button
loadModel();
