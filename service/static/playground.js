// The playground: reads the models from /v1/models, posts the form to /generate as JSON, shows the
// images, their seeds and the request's timings, and every error as the sentence the server wrote.
"use strict";

const KEY_STORAGE = "tiue-serve.api-key";
const HISTORY_STORAGE = "tiue-serve.history";
const MAX_RUNS = 30;
const HISTORY_BUDGET = 2000000; // characters of localStorage (about 5 MB in all per origin) for history
const FIELD_OF_PARAM = {
  prompt: "prompt", model: "model", n: "n", size: "size", width: "size", height: "size",
  seed: "seed", output_format: "format", decoder: "decoder",
};
const $ = (id) => document.getElementById(id);
let models = []; // from /v1/models; empty when the server lists none (one default model)
let busy = false;
let modelsNeedKey = false; // /v1/models answered 401: ask again once a key works
let runs = []; // the history shown, newest first (what localStorage keeps, see saveHistory)

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers(extra) {
  const all = { Accept: "application/json", ...extra };
  const key = apiKey();
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

function askForKey() {
  $("key-field").hidden = false;
}

/** A sentence for a failed answer: the error body's message, the retry delay for a 429. */
async function errorSentence(response) {
  let message = `The server answered ${response.status} ${response.statusText}.`;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      param = body.error.param;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  message = message.charAt(0).toUpperCase() + message.slice(1);
  if (!/[.!?]$/.test(message)) message += ".";
  if (response.status === 429) {
    const retry = response.headers.get("Retry-After");
    if (retry) message += ` Try again in ${retry} s.`;
  }
  if (response.status === 401) message += " Enter an API key below, then generate again.";
  return { message, param };
}

function showError(message, param) {
  const error = $("error");
  error.textContent = message;
  error.hidden = false;
  const field = param ? $(FIELD_OF_PARAM[param.split(".")[0]] || "") : null;
  if (field && !field.closest("[hidden]")) {
    field.setAttribute("aria-invalid", "true");
    field.setAttribute("aria-errormessage", "error");
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const field of document.querySelectorAll("[aria-invalid]")) {
    field.removeAttribute("aria-invalid");
    field.removeAttribute("aria-errormessage");
  }
}

function describe(model) {
  const parts = [];
  const size = nativeSize(model);
  if (size) parts.push(`native ${size[0]}×${size[1]}`);
  if (model.steps) parts.push(`${model.steps} steps`);
  const runsOn = [model.backend, model.precision].filter(Boolean).join(" ");
  if (runsOn) parts.push(runsOn);
  if (decoders(model).length > 1) parts.push(`decoders: ${decoders(model).join(", ")}`);
  const trained = trainedSizes(model);
  if (trained.length) parts.push(`draws best at ${trained.join(", ")}`);
  return parts.length ? `${model.id}: ${parts.join(", ")}` : model.id;
}

/** [width, height] from the model's "WxH" native size, or null when the server does not say. */
function nativeSize(model) {
  const match = /^(\d+)x(\d+)$/.exec(String(model.native_size || ""));
  return match ? [Number(match[1]), Number(match[2])] : null;
}

function trainedSizes(model) {
  return Array.isArray(model.trained_sizes) ? model.trained_sizes.map(String) : [];
}

/** The words the model was trained on, under the prompt; hidden when the model does not say. */
function showVocabulary(model) {
  const note = $("vocabulary");
  const words = model && Array.isArray(model.vocabulary) ? model.vocabulary : null;
  note.hidden = !words;
  note.textContent = words
    ? `${model.id} knows only these words: ${words.join(" ")}. Other words get a warning and are likely ignored.`
    : "";
}

function decoders(model) {
  const options = model.decoders || model.decoder_options || [];
  return Array.isArray(options) ? options : [];
}

function selectedModel() {
  return models.find((m) => m.id === $("model").value) || null;
}

function showModel() {
  const model = selectedModel();
  const sizes = $("sizes");
  sizes.replaceChildren();
  const decoderField = $("decoder-field");
  decoderField.hidden = true;
  showVocabulary(model);
  if (!model) return;
  $("model-note").textContent = describe(model);
  const native = nativeSize(model);
  if (native) {
    const [width, height] = native;
    const offered = new Set([...trainedSizes(model), `${width}x${height}`, `${2 * width}x${2 * height}`]);
    for (const size of offered) sizes.append(new Option(size));
    $("size").placeholder = `native: ${width}x${height}`;
  }
  const choices = decoders(model);
  if (choices.length > 1) {
    const select = $("decoder");
    const previous = select.value;
    select.replaceChildren(...choices.map((name) => new Option(name, name)));
    const preferred = model.default_decoder || model.decoder || choices[0];
    select.value = choices.includes(previous) ? previous : preferred;
    decoderField.hidden = false;
  }
}

/** Fill the model list from /v1/models, or fall back to the one model a server without it serves. */
async function loadModels() {
  const select = $("model");
  let response = null;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (_) { /* unreachable: the first generate will say so */ }
  if (response && response.ok) {
    const body = await response.json();
    models = Array.isArray(body.data) ? body.data.filter((m) => m && m.id) : [];
  } else {
    models = [];
    modelsNeedKey = Boolean(response && response.status === 401);
    if (modelsNeedKey) {
      askForKey();
      showError((await errorSentence(response)).message, null);
    }
  }
  if (models.length) {
    const previous = select.value;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    const preferred = models.find((m) => m.id === previous) || models.find((m) => m.default);
    if (preferred) select.value = preferred.id;
    showModel();
    return;
  }
  if (response && response.status === 503) { // still loading: ask again when the server says
    const retry = Number(response.headers.get("Retry-After")) || 2;
    $("model-note").textContent = `The server is loading its models; asking again in ${retry} s.`;
    setTimeout(loadModels, 1000 * retry);
    return;
  }
  const name = await defaultModelName();
  select.replaceChildren(new Option(name || "the server's model", ""));
  $("model-note").textContent = name ? `${name}: the one model this server serves` : "";
}

async function defaultModelName() {
  try {
    const body = await (await fetch("/readyz", { headers: { Accept: "application/json" } })).json();
    return typeof body.model === "string" ? body.model : null;
  } catch (_) {
    return null;
  }
}

/** An integer when the field holds one; otherwise the text, so the server says what is wrong with it. */
function integer(text) {
  const trimmed = text.trim();
  return /^-?\d+$/.test(trimmed) ? Number(trimmed) : trimmed;
}

function requestBody() {
  const body = { prompt: $("prompt").value, n: integer($("n").value || "1") };
  const size = $("size").value.trim();
  if (size) body.size = size;
  if (!$("seed-random").checked) body.seed = integer($("seed").value);
  body.output_format = $("format").value;
  if (models.length > 1 && $("model").value) body.model = $("model").value;
  if (!$("decoder-field").hidden) body.decoder = $("decoder").value;
  return body;
}

// -- history: every answer, newest first, kept in this browser (localStorage) -----------------------

/** Make a run from an answer: what was asked, what came back, and how long it took. */
function runOf(sent, body) {
  const seeds = body.data.map((item) => item.seed);
  return {
    created: Date.now(),
    prompt: sent.prompt,
    model: body.model,
    size: body.size,
    decoder: body.decoder || null,
    output_format: body.output_format,
    request: { ...sent, seed: seeds[0] }, // image i had seed + i: the first seed makes them all again
    images: body.data.map((item) => ({ seed: item.seed, b64: item.b64_json })),
    timings: body.timings || {},
    warnings: body.warnings || [],
    images_dropped: false,
  };
}

function loadHistory() {
  try {
    const runs = JSON.parse(localStorage.getItem(HISTORY_STORAGE) || "[]");
    return Array.isArray(runs) ? runs.filter((run) => run && typeof run.prompt === "string") : [];
  } catch (_) {
    return [];
  }
}

/** Keep at most MAX_RUNS runs and HISTORY_BUDGET characters, dropping the oldest first; a run too large
 * on its own is kept without its images. Never throws: a full quota costs history, not the page. */
function saveHistory(runs) {
  let kept = runs.slice(0, MAX_RUNS);
  while (kept.length) {
    const text = JSON.stringify(kept);
    if (text.length <= HISTORY_BUDGET) {
      try {
        localStorage.setItem(HISTORY_STORAGE, text);
        return kept;
      } catch (_) { /* the quota is smaller than the budget (or storage is off): drop more */ }
    }
    if (kept.length > 1) kept = kept.slice(0, -1);
    else if (!kept[0].images_dropped) kept = [{ ...kept[0], images: [], images_dropped: true }];
    else break;
  }
  try { localStorage.removeItem(HISTORY_STORAGE); } catch (_) { /* storage off */ }
  return [];
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function withheld(item, index, count) {
  const note = element("p", "withheld", `Image ${index + 1} of ${count} (seed ${item.seed}) was withheld: the safety checker flagged it.`);
  const entry = element("li");
  entry.append(note);
  return entry;
}

function figure(run, item, index) {
  const count = run.images.length;
  const format = run.output_format;
  if (item.b64 === null) return withheld(item, index, count);
  const extension = format === "jpeg" ? "jpg" : format;
  const url = `data:image/${format};base64,${item.b64}`;
  const image = document.createElement("img");
  image.src = url;
  image.alt = `Image ${index + 1} of ${count} for "${run.prompt}", seed ${item.seed}`;
  const seed = element("button", "seed-value", `seed ${item.seed}`);
  seed.type = "button";
  seed.setAttribute("aria-label", `Reuse seed ${item.seed}`);
  seed.title = "Reuse this seed";
  seed.addEventListener("click", () => reuseSeed(item.seed));
  const link = element("a", "", "Download");
  link.href = url;
  link.download = `tiue-${item.seed}.${extension}`;
  link.setAttribute("aria-label", `Download image ${index + 1} (seed ${item.seed}) as ${extension.toUpperCase()}`);
  const caption = element("figcaption");
  caption.append(seed, link);
  const frame = element("figure");
  frame.append(image, caption);
  const entry = element("li");
  entry.append(frame);
  return entry;
}

function timingList(timings) {
  const list = element("dl", "timings");
  for (const [stage, seconds] of Object.entries(timings)) {
    const pair = element("div");
    pair.append(element("dt", "", stage.replace(/_/g, " ")), element("dd", "", `${(1000 * seconds).toFixed(1)} ms`));
    list.append(pair);
  }
  return list;
}

/** A shell-safe single-quoted word. */
function shellQuote(text) {
  return `'${String(text).replace(/'/g, "'\\''")}'`;
}

/** The run as a curl command: the same body with its first seed, so it makes the same images. One image
 * comes back as the file itself; several as the JSON answer. --fail: an error never lands in the file. */
function curlCommand(run) {
  const body = { ...run.request };
  const parts = ["curl --fail -sS", shellQuote(`${location.origin}/generate`), "-H 'Content-Type: application/json'"];
  if (apiKey()) parts.push('-H "Authorization: Bearer $TIUE_API_KEY"');
  const single = (body.n || 1) === 1;
  const extension = run.output_format === "jpeg" ? "jpg" : run.output_format;
  if (single) parts.push("-H", shellQuote(`Accept: image/${run.output_format}`));
  parts.push("-d", shellQuote(JSON.stringify(body)));
  parts.push("-o", single ? `tiue-${body.seed}.${extension}` : `tiue-${body.seed}.json`);
  return parts.join(" ");
}

async function copyCurl(run, button) {
  const command = curlCommand(run);
  try {
    await navigator.clipboard.writeText(command);
    button.textContent = "Copied";
  } catch (_) { // no clipboard here (an insecure origin, a policy): show it, selected, to copy by hand
    const code = button.closest(".run").querySelector(".curl code");
    code.closest("details").open = true;
    getSelection().selectAllChildren(code);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = "Copy as curl"; }, 2500);
}

function runEntry(run) {
  const entry = element("li", "run");
  const title = element("h3", "run-prompt", run.prompt);
  const count = run.images.length || (run.request && run.request.n) || 0;
  const made = [`${count} ${count === 1 ? "image" : "images"}`, run.size, run.model];
  if (run.decoder) made.push(`${run.decoder} decoder`);
  made.push(new Date(run.created).toLocaleTimeString());
  entry.append(title, element("p", "run-meta", made.join(" · ")));
  if (run.warnings.length) {
    const warnings = element("ul", "warnings");
    warnings.setAttribute("aria-label", "Warnings");
    warnings.append(...run.warnings.map((text) => element("li", "", text)));
    entry.append(warnings);
  }
  if (run.images_dropped) {
    entry.append(element("p", "note", "Its images were too large to keep in this browser's storage."));
  } else {
    const grid = element("ul", "grid");
    grid.append(...run.images.map((item, i) => figure(run, item, i)));
    entry.append(grid, timingList(run.timings));
  }
  const copy = element("button", "secondary copy-curl", "Copy as curl");
  copy.type = "button";
  copy.addEventListener("click", () => copyCurl(run, copy));
  const curl = element("details", "curl");
  curl.append(element("summary", "", "curl command"), element("code", "", curlCommand(run)));
  const actions = element("div", "run-actions");
  actions.append(copy, curl);
  entry.append(actions);
  return entry;
}

function showHistory() {
  $("history").replaceChildren(...runs.map(runEntry));
  $("results").hidden = runs.length === 0;
}

/** The new run on top; the page then shows what a reload would (what storage kept), except that the new
 * run keeps its images on the page even when storage could not. */
function addRun(run) {
  const kept = saveHistory([run, ...runs]);
  runs = [run, ...kept.slice(kept.length && kept[0].created === run.created ? 1 : 0)];
  showHistory();
}

function clearHistory() {
  runs = [];
  try { localStorage.removeItem(HISTORY_STORAGE); } catch (_) { /* storage off */ }
  showHistory();
  $("status").textContent = "History cleared.";
  $("prompt").focus();
}

function reuseSeed(seed) {
  $("seed-random").checked = false;
  $("seed").disabled = false;
  $("seed").value = String(seed);
  $("seed").focus();
  $("status").textContent = `Seed ${seed} set: the next images start from it.`;
}

// -- generating -------------------------------------------------------------------------------------

/** "Generating… 1.2 s", counting while the request is out; returns the function that stops it. */
function showProgress() {
  const started = performance.now();
  $("status").textContent = "Generating…";
  const elapsed = $("elapsed");
  const progress = $("progress");
  progress.hidden = false;
  const tick = () => { elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`; };
  tick();
  const timer = setInterval(tick, 100);
  return () => {
    clearInterval(timer);
    progress.hidden = true;
    elapsed.textContent = "";
    return (performance.now() - started) / 1000;
  };
}

async function generate() {
  if (busy) return;
  busy = true;
  const button = $("generate");
  button.setAttribute("aria-disabled", "true");
  $("results").setAttribute("aria-busy", "true");
  clearError();
  const stop = showProgress();
  const sent = requestBody();
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(sent),
    });
    if (!response.ok) {
      if (response.status === 401) askForKey();
      const { message, param } = await errorSentence(response);
      stop();
      $("status").textContent = "";
      showError(message, param);
      return;
    }
    const body = await response.json();
    const seconds = stop();
    addRun(runOf(sent, body));
    if (modelsNeedKey) loadModels();
    $("status").textContent = `Done in ${seconds.toFixed(2)} s.`;
  } catch (error) {
    stop();
    $("status").textContent = "";
    showError(`Could not reach the server (${error.message}). Is it running?`, null);
  } finally {
    busy = false;
    button.removeAttribute("aria-disabled");
    $("results").removeAttribute("aria-busy");
  }
}

function start() {
  const form = $("form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  $("seed-random").addEventListener("change", (event) => {
    $("seed").disabled = event.target.checked;
    if (!event.target.checked) $("seed").focus();
  });
  $("model").addEventListener("change", showModel);
  $("clear-history").addEventListener("click", clearHistory);
  const key = $("api-key");
  key.value = apiKey();
  if (key.value) askForKey();
  key.addEventListener("input", () => {
    const value = key.value.trim();
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  key.addEventListener("change", () => {
    clearError();
    loadModels(); // the list a key may have been needed for
  });
  runs = loadHistory();
  showHistory();
  loadModels();
}

start();
