// The chat page: keeps the conversation in memory and streams replies over SSE from
// /v1/chat/completions. The API key stays in this page (never stored) and is sent as a
// Bearer token. Text is inserted with textContent, never as HTML. The model picker lists
// what /v1/models serves: the base model and its LoRA adapters (those with a `parent`).
// JSON mode asks for response_format json_object. Tools (a JSON list in the tools box) go
// with every request; the reply's tool calls show as collapsible blocks, each with a field
// whose text goes back as the `tool` message that answers it.
"use strict";

const $ = (id) => document.getElementById(id);
const messages = [];
let controller = null;
let listed = false; // the picker holds /v1/models' answer for the current key

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("b");
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

async function apiError(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function listModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) throw new Error(await apiError(resp));
  const served = (await resp.json()).data;
  const picker = $("models");
  const chosen = picker.value;
  picker.replaceChildren(...served.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.parent ? m.id + " (adapter of " + m.parent + ")" : m.id;
    return option;
  }));
  if (served.some((m) => m.id === chosen)) picker.value = chosen;
  listed = true;
}

async function model() {
  if (!listed) await listModels();
  const name = $("models").value;
  $("model").textContent = "model: " + name;
  return name;
}

function relist() {
  listed = false;
  listModels().catch(() => {}); // no key yet, or a wrong one: sending says why
}

function requestBody(name) {
  const body = {
    model: name, messages, stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value),
  };
  if ($("json_mode").checked) body.response_format = { type: "json_object" };
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (e) {
      throw new Error("the tools box is not JSON: " + e.message);
    }
    body.tool_choice = $("tool_choice").value;
  }
  return body;
}

function showCall(div, call) {
  const block = document.createElement("details");
  block.className = "tool-call";
  block.dataset.id = call.id;
  const summary = document.createElement("summary");
  summary.textContent = call.function.name + " (" + call.id + ")";
  const args = document.createElement("pre");
  args.textContent = call.function.arguments;
  const form = document.createElement("form");
  form.className = "tool-result";
  const result = document.createElement("input");
  result.placeholder = "the tool's result, sent back as a tool message";
  const button = document.createElement("button");
  button.type = "submit";
  button.textContent = "Send result";
  form.append(result, button);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (controller) return;
    messages.push({ role: "tool", tool_call_id: call.id, content: result.value });
    bubble("tool", result.value);
    button.disabled = true;
    if (!$("log").querySelector(".tool-result button:not([disabled])")) reply();
  });
  block.append(summary, args, form);
  div.append(block);
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  await reply();
}

async function reply() {
  $("error").textContent = "";
  const out = bubble("assistant", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let text = "";
  const calls = [];
  try {
    const body = requestBody(await model());
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await apiError(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            out.textContent = text;
          }
          for (const d of (choice.delta && choice.delta.tool_calls) || []) {
            const call = calls[d.index] || (calls[d.index] = { id: "", type: "function", function: { name: "", arguments: "" } });
            call.id = d.id || call.id;
            call.function.name += (d.function && d.function.name) || "";
            call.function.arguments += (d.function && d.function.arguments) || "";
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = e.message;
  } finally {
    const message = { role: "assistant", content: text || (calls.length ? null : "") };
    if (calls.length) message.tool_calls = calls;
    messages.push(message);
    for (const call of calls) showCall(out.parentElement, call);
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    out.parentElement.dataset.done = "true";
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  messages.length = 0;
  $("log").replaceChildren();
});
$("key").addEventListener("change", relist);
relist();
