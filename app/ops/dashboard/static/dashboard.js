// Cascade dashboard: reads the JSON API with the key kept in sessionStorage.
// Everything from the API is written with textContent, never parsed as HTML.
"use strict";

const KEY_ITEM = "cascade.apiKey";
const REFRESH_MS = 5000;
let timer = null;

const $ = (id) => document.getElementById(id);

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${apiKey()}` } });
  if (response.status === 401) throw new Unauthorized("the API key is unknown or revoked");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || body.title || `HTTP ${response.status}`);
  return body;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function formatRate(rate) {
  return rate === null || rate === undefined ? "–" : `${(rate * 100).toFixed(1)} %`;
}

const SVG = "http://www.w3.org/2000/svg";
const BUCKET_MS = { minute: 60000, hour: 3600000, day: 86400000 };

function outcome(status) {
  if (status === "delivered") return "delivered";
  return status === "failed" ? "failed" : "other";
}

// One stacked bar per bucket of the range (empty buckets too), from `series`.
function showSeries(stats, bucket, from, to) {
  const step = BUCKET_MS[bucket];
  const first = Math.floor(from.getTime() / step) * step;
  const totals = new Map();
  for (let at = first; at < to.getTime(); at += step) {
    totals.set(at, { delivered: 0, failed: 0, other: 0 });
  }
  for (const point of stats.series) {
    const at = new Date(point.bucket).getTime();
    if (!totals.has(at)) totals.set(at, { delivered: 0, failed: 0, other: 0 });
    totals.get(at)[outcome(point.status)] += point.messages;
  }
  const buckets = [...totals.entries()].sort((a, b) => a[0] - b[0]);
  const highest = Math.max(1, ...buckets.map(([, t]) => t.delivered + t.failed + t.other));
  const chart = $("series-chart");
  chart.replaceChildren();
  const width = 800 / buckets.length;
  buckets.forEach(([at, t], index) => {
    const group = document.createElementNS(SVG, "g");
    group.setAttribute("class", "bucket");
    group.dataset.bucket = new Date(at).toISOString();
    let y = 180;
    for (const kind of ["delivered", "failed", "other"]) {
      group.dataset[kind] = t[kind];
      if (!t[kind]) continue;
      const height = (170 * t[kind]) / highest;
      y -= height;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("class", kind);
      rect.setAttribute("x", String(index * width + width * 0.1));
      rect.setAttribute("width", String(Math.max(width * 0.8, 1)));
      rect.setAttribute("y", String(y));
      rect.setAttribute("height", String(height));
      group.appendChild(rect);
    }
    const title = document.createElementNS(SVG, "title");
    title.textContent =
      `${new Date(at).toLocaleString()}: delivered ${t.delivered}, failed ${t.failed},` +
      ` other ${t.other}`;
    group.appendChild(title);
    chart.appendChild(group);
  });
  $("series-bucket").textContent = bucket;
  const axis = $("series-axis");
  axis.replaceChildren();
  if (buckets.length) {
    for (const at of [buckets[0][0], buckets[buckets.length - 1][0]]) {
      const label = document.createElement("span");
      label.textContent = new Date(at).toLocaleString();
      axis.appendChild(label);
    }
  }
}

function showStats(stats) {
  const delivered = stats.by_status.delivered || 0;
  $("total-messages").textContent = stats.messages;
  $("total-delivered").textContent = delivered;
  const failed = stats.by_status.failed || 0;
  $("total-failed").textContent = failed;
  $("total-other").textContent = stats.messages - delivered - failed;
  $("failover-rate").textContent = formatRate(stats.failover_rate);
  $("median").textContent = formatMs(stats.time_to_deliver.median_ms);
  $("p95").textContent = formatMs(stats.time_to_deliver.p95_ms);

  const tally = {};
  for (const count of stats.counts) {
    const key = `${count.category}/${count.channel}`;
    tally[key] = tally[key] || { ok: 0, bad: 0 };
    tally[key][count.status === "delivered" ? "ok" : "bad"] += count.messages;
  }
  for (const td of document.querySelectorAll("td.counter")) {
    const t = tally[`${td.dataset.category}/${td.dataset.channel}`] || { ok: 0, bad: 0 };
    td.querySelector(".ok").textContent = t.ok;
    td.querySelector(".bad").textContent = t.bad;
  }

  const funnel = $("funnel");
  funnel.replaceChildren();
  if (stats.steps.length === 0) {
    funnel.textContent = "No finished messages in this range.";
  }
  for (const step of stats.steps) {
    const wrap = document.createElement("div");
    wrap.className = "funnel-step";
    const label = document.createElement("div");
    const lost = step.ended - step.delivered;
    label.textContent =
      `Step ${step.step}: reached ${step.reached}, delivered ${step.delivered}` +
      ` (${formatRate(step.delivery_rate)}), ended undelivered ${lost}`;
    label.className = "funnel-label";
    const bar = document.createElement("div");
    bar.className = "funnel-bar";
    const ok = document.createElement("span");
    ok.className = "delivered";
    ok.style.width = `${stats.messages ? (100 * step.delivered) / stats.messages : 0}%`;
    const bad = document.createElement("span");
    bad.className = "ended";
    bad.style.width = `${stats.messages ? (100 * lost) / stats.messages : 0}%`;
    bar.append(ok, bad);
    wrap.append(label, bar);
    funnel.appendChild(wrap);
  }
  showEffectiveness(stats);
}

function formatMoney(amount, currency) {
  return amount === null || amount === undefined ? "–" : `${amount} ${currency || ""}`.trim();
}

const EFFECTIVENESS = [
  ["delivery rate", "ok", (c) => c.delivery_rate, (c) => formatRate(c.delivery_rate), () => 1],
  ["median to deliver", "accent", (c) => c.median_ms, (c) => formatMs(c.median_ms), null],
  ["cost per delivered", "cost", (c) => c.cost_per_delivered === null ? null : Number(c.cost_per_delivered),
    (c, currency) => formatMoney(c.cost_per_delivered, currency), null],
  ["fell over", "bad", (c) => c.fell_over, (c) => formatRate(c.fell_over), () => 1],
];

function showEffectiveness(stats) {
  $("spend").textContent = formatMoney(stats.cost, stats.currency);
  $("saved").textContent = formatMoney(stats.saved, stats.currency);
  $("unpriced").textContent = stats.unpriced
    ? `${stats.unpriced} message(s) have no known cost (accounts without a price).`
    : "";
  const chart = $("effectiveness");
  chart.replaceChildren();
  if (stats.by_channel.length === 0) {
    chart.textContent = "No finished messages in this range.";
    return;
  }
  const largest = EFFECTIVENESS.map(([, , value]) =>
    Math.max(0, ...stats.by_channel.map((c) => value(c) || 0)));
  for (const c of stats.by_channel) {
    const row = document.createElement("div");
    row.className = "effect-row";
    row.dataset.category = c.category;
    row.dataset.channel = c.channel;
    const name = document.createElement("div");
    name.className = "effect-name";
    name.textContent = `${c.category} · ${c.channel} (${c.messages})`;
    row.appendChild(name);
    EFFECTIVENESS.forEach(([label, tone, value, text, scale], i) => {
      const metric = document.createElement("div");
      metric.className = "effect-metric";
      const caption = document.createElement("div");
      caption.className = "effect-caption";
      caption.textContent = `${label}: ${text(c, stats.currency)}`;
      const bar = document.createElement("div");
      bar.className = "effect-bar";
      const fill = document.createElement("span");
      fill.className = tone;
      const top = scale ? scale() : largest[i];
      const v = value(c);
      fill.style.width = `${v && top ? Math.min(100, (100 * v) / top) : 0}%`;
      bar.appendChild(fill);
      metric.append(caption, bar);
      row.appendChild(metric);
    });
    chart.appendChild(row);
  }
}

function showFailures(page) {
  const body = $("failures").querySelector("tbody");
  body.replaceChildren();
  for (const message of page.data) {
    const row = document.createElement("tr");
    const idCell = cell(row, "");
    const link = document.createElement("a");
    link.textContent = message.id;
    link.addEventListener("click", () => lookup(message.id));
    idCell.appendChild(link);
    cell(row, message.category);
    cell(row, new Date(message.created_at).toLocaleString());
    const error = message.last_error;
    cell(row, error ? `${error.step} (${error.channel})` : "");
    cell(row, error ? `${error.code}${error.detail ? ": " + error.detail : ""}` : "", "bad");
    body.appendChild(row);
  }
  if (page.data.length === 0) {
    const row = document.createElement("tr");
    cell(row, "No failed messages.", "muted").colSpan = 5;
    body.appendChild(row);
  }
}

async function lookup(id) {
  $("lookup-id").value = id;
  try {
    const message = await api(`/v1/messages/${encodeURIComponent(id.trim())}`);
    $("timeline").hidden = false;
    $("timeline-summary").textContent =
      `${message.id}: ${message.status}` +
      (message.delivered_channel ? ` on ${message.delivered_channel}` : "") +
      ` · ${message.category} · created ${new Date(message.created_at).toLocaleString()}`;
    const attempts = $("timeline-attempts").querySelector("tbody");
    attempts.replaceChildren();
    for (const a of message.attempts) {
      const row = document.createElement("tr");
      cell(row, a.step);
      cell(row, a.channel);
      cell(row, a.provider);
      cell(row, a.status, a.status === "delivered" || a.status === "read" ? "ok" : "");
      cell(row, a.tries);
      cell(row, a.error ? `${a.error.code}${a.error.detail ? ": " + a.error.detail : ""}` : "", "bad");
      attempts.appendChild(row);
    }
    const events = $("timeline-events").querySelector("tbody");
    events.replaceChildren();
    for (const e of message.events) {
      const row = document.createElement("tr");
      cell(row, e.seq);
      cell(row, new Date(e.at).toLocaleTimeString());
      cell(row, e.status);
      cell(row, e.source);
      cell(row, e.step === null ? "" : e.step);
      cell(row, e.detail ? JSON.stringify(e.detail) : "");
      events.appendChild(row);
    }
    $("error").textContent = "";
  } catch (error) {
    handle(error);
  }
}

function handle(error) {
  if (error instanceof Unauthorized) {
    signOut(error.message);
    return;
  }
  $("error").textContent = error.message;
}

async function refresh() {
  const [seconds, bucket] = $("range").value.split(":");
  const to = new Date();
  const from = new Date(to.getTime() - Number(seconds) * 1000);
  const range = `from=${encodeURIComponent(from.toISOString())}&to=${encodeURIComponent(
    new Date(to.getTime() + 60000).toISOString(),
  )}&bucket=${bucket}`;
  try {
    const [stats, failures] = await Promise.all([
      api(`/v1/stats?${range}`),
      api("/v1/messages?status=failed&limit=10"),
    ]);
    showStats(stats);
    showSeries(stats, bucket, from, to);
    showFailures(failures);
    $("error").textContent = "";
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    handle(error);
  }
}

function signIn() {
  $("login").hidden = true;
  $("board").hidden = false;
  $("logout").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function signOut(reason) {
  sessionStorage.removeItem(KEY_ITEM);
  clearInterval(timer);
  $("board").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = reason || "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
    $("api-key").value = "";
    try {
      await api("/v1/messages?limit=1");
      $("login-error").textContent = "";
      signIn();
    } catch (error) {
      signOut(error.message);
    }
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("range").addEventListener("change", refresh);
  $("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookup($("lookup-id").value);
  });
  if (apiKey()) signIn();
});
