// The playground: reads the models from /v1/models, posts the form to /generate as JSON, shows the
// images, their seeds and the request's timings, and every error as the sentence the server wrote.
"use strict";

const KEY_STORAGE = "tiue-serve.api-key";
const FIELD_OF_PARAM = {
  prompt: "prompt", model: "model", n: "n", size: "size", width: "size", height: "size",
  seed: "seed", output_format: "format", decoder: "decoder",
};
const $ = (id) => document.getElementById(id);
let models = []; // from /v1/models; empty when the server lists none (one default model)
let busy = false;
let modelsNeedKey = false; // /v1/models answered 401: ask again once a key works

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
  const runs = [model.backend, model.precision].filter(Boolean).join(" ");
  if (runs) parts.push(runs);
  if (decoders(model).length > 1) parts.push(`decoders: ${decoders(model).join(", ")}`);
  return parts.length ? `${model.id}: ${parts.join(", ")}` : model.id;
}

/** [width, height] from the model's "WxH" native size, or null when the server does not say. */
function nativeSize(model) {
  const match = /^(\d+)x(\d+)$/.exec(String(model.native_size || ""));
  return match ? [Number(match[1]), Number(match[2])] : null;
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
  if (!model) return;
  $("model-note").textContent = describe(model);
  const native = nativeSize(model);
  if (native) {
    const [width, height] = native;
    for (const scale of [1, 2]) sizes.append(new Option(`${scale * width}x${scale * height}`));
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

function withheld(item, index, count) {
  const note = document.createElement("p");
  note.className = "withheld";
  note.textContent = `Image ${index + 1} of ${count} (seed ${item.seed}) was withheld: the safety checker flagged it.`;
  const entry = document.createElement("li");
  entry.append(note);
  return entry;
}

function figure(item, index, count, format) {
  if (item.b64_json === null) return withheld(item, index, count);
  const extension = format === "jpeg" ? "jpg" : format;
  const url = `data:image/${format};base64,${item.b64_json}`;
  const image = document.createElement("img");
  image.src = url;
  image.alt = `Image ${index + 1} of ${count}, seed ${item.seed}`;
  const seed = document.createElement("span");
  seed.className = "seed-value";
  seed.textContent = `seed ${item.seed}`;
  const link = document.createElement("a");
  link.href = url;
  link.download = `tiue-${item.seed}.${extension}`;
  link.textContent = "Download";
  link.setAttribute("aria-label", `Download image ${index + 1} (seed ${item.seed}) as ${extension.toUpperCase()}`);
  const caption = document.createElement("figcaption");
  caption.append(seed, link);
  const frame = document.createElement("figure");
  frame.append(image, caption);
  const entry = document.createElement("li");
  entry.append(frame);
  return entry;
}

function showResult(body) {
  const count = body.data.length;
  $("grid").replaceChildren(...body.data.map((item, i) => figure(item, i, count, body.output_format)));
  $("warnings").replaceChildren(...(body.warnings || []).map((text) => {
    const entry = document.createElement("li");
    entry.textContent = text;
    return entry;
  }));
  const stages = Object.entries(body.timings || {}).map(([stage, seconds]) => {
    const pair = document.createElement("div");
    const name = document.createElement("dt");
    name.textContent = stage.replace(/_/g, " ");
    const value = document.createElement("dd");
    value.textContent = (1000 * seconds).toFixed(1);
    pair.append(name, value);
    return pair;
  });
  $("timings").replaceChildren(...stages);
  const made = [`${count} ${count === 1 ? "image" : "images"}`, body.size, body.model];
  if (body.decoder) made.push(`${body.decoder} decoder`);
  $("results-title").textContent = made.join(" · ");
  $("results").hidden = false;
}

async function generate() {
  if (busy) return;
  busy = true;
  const button = $("generate");
  button.setAttribute("aria-disabled", "true");
  $("results").setAttribute("aria-busy", "true");
  clearError();
  $("status").textContent = "Generating…";
  const started = performance.now();
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(requestBody()),
    });
    if (!response.ok) {
      if (response.status === 401) askForKey();
      const { message, param } = await errorSentence(response);
      $("status").textContent = "";
      showError(message, param);
      return;
    }
    const body = await response.json();
    showResult(body);
    if (modelsNeedKey) loadModels();
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("status").textContent = `Done in ${seconds} s.`;
  } catch (error) {
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
  loadModels();
}

start();
