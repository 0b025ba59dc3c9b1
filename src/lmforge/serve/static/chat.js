// The chat page: keeps the conversation in memory and streams replies over SSE from
// /v1/chat/completions. The API key stays in this page (never stored) and is sent as a
// Bearer token. Text is inserted with textContent, never as HTML. The model picker lists
// what /v1/models serves: the base model and its LoRA adapters (those with a `parent`).
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

async function send(text) {
  $("error").textContent = "";
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "";
  try {
    const body = {
      model: await model(), messages, stream: true,
      temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value),
    };
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
            reply += choice.delta.content;
            out.textContent = reply;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = e.message;
  } finally {
    messages.push({ role: "assistant", content: reply });
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
