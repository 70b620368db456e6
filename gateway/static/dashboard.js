// The linguamq dashboard: renders the gateway's cluster snapshot (gateway/view.py documents
// its fields) on each `state` event of /api/events, and chats through /v1/chat/completions.
// Plain DOM, no library: every text goes in with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "linguamq.key";
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"];
let source = null;          // the EventSource, while open
let retryTimer = null;
const colours = new Map();  // node name -> colour, kept while the page lives (stable across plans)
const history = [];         // the chat's messages, sent whole with each turn

// --- small helpers -----------------------------------------------------------------------

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits = 0, unit = "") {
  if (value === null || value === undefined || value === "" || Number.isNaN(value)) return "—";
  return (typeof value === "number" ? value.toFixed(digits) : String(value)) + unit;
}

function colourOf(name) {
  if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
  return colours.get(name);
}

function key() { return localStorage.getItem(KEY_STORE) || ""; }
function keyParam() { return key() ? "?key=" + encodeURIComponent(key()) : ""; }

// --- connection ----------------------------------------------------------------------------

function setConn(state, text) {
  const conn = $("conn");
  conn.dataset.state = state;
  conn.textContent = text || state;
}

// Ask /api/state first: a 401 there means the key form, not an event stream that fails blindly.
async function connect() {
  clearTimeout(retryTimer);
  if (source) { source.close(); source = null; }
  setConn("connecting");
  let response;
  try {
    response = await fetch("/api/state" + keyParam());
  } catch (_) {
    return retryLater();
  }
  if (response.status === 401) return askForKey(await errorMessage(response));
  if (!response.ok) return retryLater();
  $("key-form").hidden = true;
  render(await response.json());
  source = new EventSource("/api/events" + keyParam());
  source.addEventListener("state", (e) => { setConn("live"); render(JSON.parse(e.data)); });
  source.onopen = () => setConn("live");
  source.onerror = () => {
    // CONNECTING: the browser retries by itself; CLOSED: it gave up (an error status), so do we, later.
    if (source && source.readyState === EventSource.CLOSED) retryLater();
    else setConn("reconnecting");
  };
}

function retryLater() {
  if (source) { source.close(); source = null; }
  setConn("reconnecting");
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, 3000);
}

function askForKey(message) {
  setConn("key", "API key needed");
  $("key-form").hidden = false;
  $("key-error").textContent = key() ? message : "";
  $("key-input").focus();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (_) {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

// --- rendering ------------------------------------------------------------------------------

function render(s) {
  $("cluster").textContent = "cluster " + s.cluster;
  $("model").textContent = s.model ? `${s.model.name} (${s.model.family}, ${s.model.quantization}, `
    + `${s.model.layers} layers)` : "no model yet";
  for (const n of s.nodes) colourOf(n.name);
  renderPlan(s.plan, s.model);
  renderRequests(s.requests, s.tokens_per_s);
  renderNodes(s.nodes, s.plan);
  renderEpochs(s.epochs);
}

function renderPlan(plan, model) {
  const section = $("plan");
  section.dataset.epoch = plan ? plan.epoch : "";
  $("plan-epoch").textContent = plan ? `epoch ${plan.epoch}, objective ${plan.objective}` : "no plan yet";
  const pieces = model ? model.pieces : [];
  const stages = plan ? plan.stages : [];
  const bottleneck = plan && plan.bottleneck ? plan.bottleneck : null;
  const labels = pieceLabels(pieces);
  $("plan-bar").replaceChildren(...pieces.map((_, i) => {
    const stage = stages.find((st) => st.first <= i && i <= st.last);
    const cell = el("div", {class: "cell", "data-piece": i, "data-node": stage ? stage.node : "",
      title: `${labels[i]}: ${stage ? stage.node : "not placed"}`}, labels[i]);
    if (stage) cell.style.background = colourOf(stage.node);
    if (stage && stage.node === bottleneck) cell.classList.add("bottleneck");
    return cell;
  }));
  $("plan-legend").replaceChildren(...stages.map((st) => {
    const item = el("span", {class: "legend-item", "data-node": st.node});
    const swatch = el("i", {class: "swatch"});
    swatch.style.background = colourOf(st.node);
    item.append(swatch, el("span", {}, st.node + (st.node === bottleneck ? " (bottleneck)" : "")));
    return item;
  }));
  $("plan-summary").textContent = plan ? `predicted ${fmt(plan.predicted_ms_per_token, 1)} ms/token, measured `
    + `${fmt(plan.measured_ms_per_token, 1)} ms/token` + (bottleneck ? `, bottleneck ${bottleneck}` : "") : "";
  $("plan-reason").textContent = plan ? plan.reason : "";
  $("plan-stages").tBodies[0].replaceChildren(...stages.map((st, i) => {
    const row = el("tr", {"data-node": st.node});
    if (st.node === bottleneck) row.classList.add("bottleneck");
    const span = st.first === st.last ? labels[st.first] : `${labels[st.first]} – ${labels[st.last]}`;
    for (const text of [i, st.node, span || "?", fmt(st.predicted_ms, 1), fmt(st.measured_ms, 1)]) {
      row.append(el("td", {}, String(text)));
    }
    return row;
  }));
  $("plan-left-out").replaceChildren(...(plan ? plan.left_out : []).map((lo) =>
    el("li", {"data-node": lo.node}, `${lo.node} left out: ${lo.why}`)));
}

// "embed", "L0", "L1", ..., "head": layers numbered as the model numbers them.
function pieceLabels(pieces) {
  let layer = 0;
  return pieces.map((kind) => kind === "layer" ? "L" + layer++ : kind);
}

function renderRequests(requests, rates) {
  for (const b of $("requests").querySelectorAll("[data-field]")) {
    b.textContent = requests ? fmt(requests[b.dataset.field]) : "—";
  }
  const svg = $("throughput");
  svg.replaceChildren();
  if (rates.length < 2) {
    $("tokens-now").textContent = "";
    return;
  }
  const [w, h] = [300, 80];
  const t0 = rates[0][0], span = Math.max(1, rates[rates.length - 1][0] - t0);
  const peak = Math.max(...rates.map((r) => r[1])), top = Math.max(1, peak);  // an idle line lies at the bottom
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("class", "rate");
  line.setAttribute("points", rates.map(([t, r]) => `${((t - t0) / span * w).toFixed(1)},`
    + `${(h - 1 - r / top * (h - 4)).toFixed(1)}`).join(" "));
  svg.append(line);
  $("tokens-now").textContent = `now ${fmt(rates[rates.length - 1][1], 1)}, peak ${fmt(peak, 1)} `
    + `over the last ${fmt(span / 60, 1)} min`;
}

function renderNodes(nodes, plan) {
  const bottleneck = plan && plan.bottleneck;
  const staged = new Set(plan ? plan.stages.map((st) => st.node) : []);
  $("nodes").replaceChildren(...nodes.map((n) => {
    const card = el("div", {class: "node", "data-node": n.name, "data-online": String(n.online)});
    if (n.name === bottleneck) card.classList.add("bottleneck");
    const swatch = el("i", {class: "swatch"});
    swatch.style.background = colourOf(n.name);
    const title = el("h3");
    title.append(swatch, el("span", {class: "name"}, n.name),
      el("span", {class: "badge " + (n.online ? "online" : "offline")}, n.online ? "online" : "offline"));
    if (staged.has(n.name)) title.append(el("span", {class: "tag"}, "in plan"));
    if (n.name === bottleneck) title.append(el("span", {class: "tag bottleneck"}, "bottleneck"));
    const profile = n.profile || {};
    const fields = [
      ["state", fmt(n.state)], ["platform", fmt(n.platform)], ["threads", fmt(n.threads)],
      ["decode", fmt(profile.ms_per_gflop_decode, 0, " ms/GFLOP")],
      ["memory", `rss ${fmt(n.rss_mb, 0, " MB")}, free ${fmt(n.free_mem_mb, 0, " MB")}, budget `
        + (n.mem_budget_mb ? fmt(n.mem_budget_mb, 0, " MB") : "none")],
      ["battery", fmt(n.battery_pct, 0, " %")], ["temperature", fmt(n.thermal_c, 0, " °C")],
      ["busy", fmt(n.busy_pct, 0, " %")], ["sessions", fmt(n.sessions)], ["KV", fmt(n.kv_mb, 1, " MB")],
      ["errors", fmt(n.errors)], ["last seen", n.seen_s_ago === null ? "—" : fmt(n.seen_s_ago, 1, " s ago")],
    ];
    const list = el("dl");
    for (const [name, value] of fields) {
      list.append(el("dt", {}, name), el("dd", {"data-field": name}, value));
    }
    card.append(title, list);
    return card;
  }));
}

function renderEpochs(epochs) {
  $("epochs").replaceChildren(...epochs.map((e) => {
    const item = el("li", {"data-epoch": e.epoch});
    item.append(el("b", {}, `epoch ${e.epoch}`), el("span", {class: "muted"},
      ` ${new Date(e.at * 1000).toLocaleTimeString()} · ${e.nodes.join(", ") || "no nodes"} · `), el("span", {}, e.reason));
    return item;
  }));
}

// --- chat -------------------------------------------------------------------------------------

function addMessage(role, text) {
  const message = el("div", {class: "msg " + role, "data-role": role}, text);
  $("chat-log").append(message);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return message;
}

function showChatError(message) {
  $("chat-error").textContent = message;
  $("chat-error").hidden = false;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  $("chat-error").hidden = true;
  $("chat-send").disabled = true;
  history.push({role: "user", content: text});
  addMessage("user", text);
  const old = $("chat-answer");
  if (old) old.removeAttribute("id");
  const answer = addMessage("assistant", "");
  answer.id = "chat-answer";
  answer.dataset.done = "false";
  try {
    const content = await streamAnswer(answer);
    history.push({role: "assistant", content});
  } catch (err) {
    history.pop();  // the turn failed: the next one is sent without it
    answer.classList.add("failed");
    showChatError(err.message);
  } finally {
    answer.dataset.done = "true";
    $("chat-send").disabled = false;
  }
}

// POST the conversation with stream: true and append each delta as its `data:` line arrives.
async function streamAnswer(answer) {
  const headers = {"Content-Type": "application/json"};
  if (key()) headers.Authorization = "Bearer " + key();
  const temperature = Number($("chat-temperature").value), maxTokens = Number($("chat-max-tokens").value);
  const response = await fetch("/v1/chat/completions", {method: "POST", headers,
    body: JSON.stringify({messages: history, stream: true, temperature: Number.isFinite(temperature) ? temperature : 1,
                          max_tokens: Number.isInteger(maxTokens) && maxTokens > 0 ? maxTokens : undefined})});
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) askForKey(message);
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", content = "";
  for (;;) {
    const {value, done} = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), {stream: !done});
    const lines = buffer.split("\n");
    buffer = done ? "" : lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return content;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        content += delta.content;
        answer.textContent = content;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    }
    if (done) throw new Error("the answer ended before it was complete");
  }
}

// --- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    connect();
  });
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-clear").addEventListener("click", () => {
    history.length = 0;
    $("chat-log").replaceChildren();
    $("chat-error").hidden = true;
  });
  connect();
});
