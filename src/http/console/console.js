// proclog console: refreshes server-rendered fragments and streams a process's events.
// No framework; the server renders every page, this only keeps it current.
"use strict";

const TERMINAL_TYPES = new Set(["process.completed", "process.failed", "process.cancelled",
                                "process.abandoned"]);

const connection = () => document.getElementById("connection");

function setConnection(state, text) {
  const badge = connection();
  if (!badge) return;
  badge.className = "connection " + state;
  badge.textContent = text;
}

// Re-fetches the page with ?fragment=1 and replaces the element's content. A pod that does not
// answer or a database that is down is shown, with the last data kept, and retried.
function keepFresh(element) {
  const every = Number(element.dataset.refresh) || 2000;
  const url = new URL(window.location.href);
  url.searchParams.set("fragment", "1");
  let failures = 0;
  async function refresh() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.redirected) {
        // Signed out (the session cookie is gone): show the sign-in page.
        window.location.reload();
        return;
      }
      const html = await response.text();
      const banner = document.getElementById("banner");
      if (response.status === 503) {
        banner.innerHTML = html;
        setConnection("db", "database unavailable");
      } else if (response.ok) {
        banner.innerHTML = "";
        element.innerHTML = html;
        setConnection("ok", "live");
      } else {
        setConnection("down", "error " + response.status);
      }
      failures = 0;
    } catch (_) {
      failures += 1;
      document.getElementById("banner").innerHTML =
        '<p class="error" role="alert">This pod is not answering: retrying, and trying the ' +
        "other pods. Behind a load balancer the next attempt reaches another pod.</p>";
      setConnection("down", "pod not answering, retrying");
      if (failures >= 2) tryPeers();
    }
    setTimeout(refresh, Math.min(every * (1 + failures), 10000));
  }
  setTimeout(refresh, every);
}

// When the pod serving this page stops answering, the same page on another running pod (from
// the page's list of peers) takes over: the first one that answers is opened.
let movingOn = false;
async function tryPeers() {
  if (movingOn) return;
  const meta = document.querySelector('meta[name="proclog-peers"]');
  const peers = meta ? meta.content.split(" ").filter(Boolean) : [];
  movingOn = true;
  for (const peer of peers) {
    try {
      await fetch(peer + "/healthz", { mode: "no-cors", cache: "no-store" });
      window.location.href = peer + window.location.pathname + window.location.search;
      return;
    } catch (_) {
      // Not reachable from this browser; try the next one.
    }
  }
  movingOn = false;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function formatTime(iso) {
  const date = new Date(iso);
  if (isNaN(date)) return iso;
  return date.toISOString().replace("T", " ").replace("Z", "");
}

function truncate(text, limit) {
  return text.length <= limit ? text : text.slice(0, limit) + "…";
}

// Rows kept on the page; older ones are dropped as new ones arrive.
const MAX_ROWS = 2000;

// Adds one event to the timeline, marking a change of writer or generation as a takeover.
// Events arrive in seq order; the caller skips those already shown.
function addEvent(tbody, event) {
  const generation = event.lease_generation == null ? "–" : String(event.lease_generation);
  const last = tbody.lastElementChild;
  const row = document.createElement("tr");
  row.dataset.seq = event.seq;
  row.dataset.writer = event.writer;
  row.dataset.generation = generation;
  if (last && (last.dataset.writer !== event.writer || last.dataset.generation !== generation)) {
    row.className = "takeover";
  }
  const payload = document.createElement("td");
  const code = document.createElement("code");
  code.textContent = truncate(JSON.stringify(event.payload), 300);
  payload.appendChild(code);
  row.append(cell(event.seq), cell(event.event_type), cell(event.writer), cell(generation),
             cell(formatTime(event.occurred_at)), payload);
  tbody.appendChild(row);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(0);
}

// Streams the process's events from the SSE endpoint with fetch (so the console's cookie and
// any event name work), resuming after the last seq shown; reconnects with backoff until the
// stream ends with the terminal event (204 on reconnect).
function streamTimeline(table) {
  const id = table.dataset.process;
  const tbody = table.querySelector("tbody");
  const state = document.getElementById("stream-state");
  let after = Number(table.dataset.after) || 0;
  let failures = 0;
  async function connect() {
    try {
      const response = await fetch(`/v1/processes/${encodeURIComponent(id)}/stream?after=${after}`,
        { credentials: "same-origin", headers: { Accept: "text/event-stream" }, cache: "no-store" });
      if (response.status === 204) {
        state.textContent = "The process has ended: its log is complete.";
        return;
      }
      if (!response.ok) {
        // The pod answered: it is not down. Say why and try again later, here.
        state.textContent = `The stream answered ${response.status}; retrying…`;
        failures = Math.min(failures + 1, 5);
        setTimeout(connect, Math.min(1000 * failures, 5000));
        return;
      }
      state.textContent = "Streaming live.";
      failures = 0;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let split;
        while ((split = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, split);
          buffer = buffer.slice(split + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue;
          let event;
          try { event = JSON.parse(data); } catch (_) { continue; }
          if (typeof event.seq !== "number" || event.seq <= after) continue;
          addEvent(tbody, event);
          after = Math.max(after, event.seq);
          if (TERMINAL_TYPES.has(event.event_type)) {
            state.textContent = "The process has ended: its log is complete.";
            return;
          }
        }
      }
    } catch (_) {
      failures += 1;
      if (failures >= 2) tryPeers();
    }
    state.textContent = "Stream interrupted; reconnecting…";
    setTimeout(connect, Math.min(250 * 2 ** failures, 5000));
  }
  connect();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(keepFresh);
  const timeline = document.getElementById("timeline");
  if (timeline) streamTimeline(timeline);
});
