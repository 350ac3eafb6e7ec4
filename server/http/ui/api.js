// Talking to the server: JSON and form requests with the admin key as the bearer header, errors
// as the API words them, and Server-Sent Events read through fetch (EventSource cannot send a key).

const KEY = "softprompt-admin-key";

export function adminKey() { return sessionStorage.getItem(KEY) || ""; }
export function setAdminKey(value) {
  if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
  }
}

function headers(extra = {}) {
  const key = adminKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export async function api(path, { method = "GET", json, form } = {}) {
  const init = { method, headers: headers(json ? { "Content-Type": "application/json" } : {}) };
  if (json !== undefined) init.body = JSON.stringify(json);
  if (form !== undefined) init.body = form;
  const answer = await fetch(path, init);
  const text = await answer.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!answer.ok) throw new ApiError(answer.status, body);
  return body;
}

// Calls onEvent(name, data) for every event of a stream; resolves when it ends.
export async function stream(path, { method = "GET", json, onEvent, signal } = {}) {
  const init = { method, signal, headers: headers(json ? { "Content-Type": "application/json" } : {}) };
  if (json !== undefined) init.body = JSON.stringify(json);
  const answer = await fetch(path, init);
  if (!answer.ok) {
    let body = null;
    try { body = await answer.json(); } catch { body = null; }
    throw new ApiError(answer.status, body);
  }
  const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
