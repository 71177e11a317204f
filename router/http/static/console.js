// ops-router console: plain JavaScript, no build step, no library.
// Data: GET /exceptions/open (the open set), /state/<kind>/<key>, and this console's
// /console/deadletters and /console/history/<kind>/<key>; pushed live by the router's
// server-sent events at /feed (`raise` and `clear` as published, a `tick` each second).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KINDS = ["sku", "shipment", "campaign"];
  const SEVERITY_ORDER = { critical: 0, warning: 1 };
  const FEED_MAX = 100;
  const LIST_MAX = 200;
  const STALE_S = 5;   // numbers older than this are marked stale, older than DEAD_S dead
  const DEAD_S = 15;
  const CHECK_OPEN_S = 15;

  const st = {
    open: new Map(),        // kind|key|rule|location -> the raise's payload
    counts: new Map(),      // severity|kind|rule|location -> how many are open (the open index's)
    countsNote: "",
    openTotal: 0,           // the server's count when the open set was read
    truncated: false,
    loaded: false,
    pending: [],            // feed exceptions that arrived while the open set loaded
    filter: null,           // {field, value}
    statsAt: 0,             // Date.now() of the last tick
    live: false,
    deadSeen: undefined,    // the tick's dead_letters last seen
    entity: null,           // {kind, key} shown in the drill-down
  };

  // --- DOM helpers (text only: nothing from the server is ever parsed as HTML) -----------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function setText(id, text) {
    const node = $(id);
    const s = String(text);
    if (node.textContent !== s) {
      node.textContent = s;
      node.classList.remove("tick");
      void node.offsetWidth; // restart the highlight
      node.classList.add("tick");
    }
  }
  const fmt = (n) => (n === null || n === undefined || Number.isNaN(n) ? "?" : Number(n).toLocaleString("en-US"));
  const fmtRate = (n) => (n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(1));
  function fmtAge(s) {
    if (s === null || s === undefined) return "?";
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
  }
  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }
  const keyOf = (e) => [e.kind, e.key, e.rule, e.location ?? ""].join("|");

  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) {
      // The session ended (router restarted, or it expired): the page at / asks to log in again.
      window.location.reload();
      throw new Error("unauthorized");
    }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || body.detail || `${url}: HTTP ${r.status}`);
    return body;
  }

  // --- the open set ---------------------------------------------------------------------
  const GROUP_FIELDS = ["severity", "kind", "rule", "location"];
  const groupKey = (e) => GROUP_FIELDS.map((f) => e[f] ?? "").join("|");

  async function loadBoard() {
    const r = await getJSON("/console/board");
    const counts = new Map();
    for (const [severity, kind, rule, location, n] of r.groups || []) {
      counts.set(groupKey({ severity, kind, rule, location }), n);
    }
    return { counts, note: r.partitions && r.partitions.length < r.partition_count
      ? `counts of partitions ${r.partitions.join(", ")} of ${r.partition_count}` : "" };
  }

  async function loadOpen() {
    const board = await loadBoard();
    const open = new Map();
    let after = null;
    let total = 0;
    let pages = 0;
    do {
      const q = new URLSearchParams({ limit: "1000" });
      if (after) q.set("after", after);
      const r = await getJSON(`/exceptions/open?${q}`);
      for (const e of r.open || []) open.set(keyOf(e), e);
      total = r.total ?? open.size;
      after = r.next ?? null;
      pages += 1;
    } while (after && pages < 20);
    st.open = open;
    st.counts = board.counts;
    st.countsNote = board.note;
    st.openTotal = total;
    st.truncated = Boolean(after);
    st.loaded = true;
    const pending = st.pending;
    st.pending = [];
    for (const e of pending) applyException(e);
    renderBoard();
  }

  function applyException(e) {
    const k = keyOf(e);
    const g = groupKey(e);
    if (e.status === "raised") {
      if (!st.open.has(k)) st.counts.set(g, (st.counts.get(g) || 0) + 1);
      st.open.set(k, e);
    } else if (e.status === "cleared") {
      if (st.open.has(k) || st.truncated) {
        const n = (st.counts.get(g) || 0) - 1;
        if (n > 0) st.counts.set(g, n);
        else st.counts.delete(g);
      }
      st.open.delete(k);
    }
  }

  let boardQueued = false;
  function scheduleBoard() {
    if (boardQueued) return;
    boardQueued = true;
    requestAnimationFrame(() => {
      boardQueued = false;
      renderBoard();
    });
  }

  function groupCounts(field) {
    const i = GROUP_FIELDS.indexOf(field);
    const counts = new Map();
    for (const [g, n] of st.counts) {
      const v = g.split("|")[i] || "(none)";
      counts.set(v, (counts.get(v) || 0) + n);
    }
    return [...counts.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
  }

  function renderGroup(field) {
    const ul = $(`g-${field}`);
    const rows = groupCounts(field).slice(0, 12);
    ul.replaceChildren(
      ...rows.map(([value, n]) => {
        const sel = st.filter && st.filter.field === field && st.filter.value === value;
        return el(
          "li",
          {
            class: sel ? "sel" : "",
            dataset: { field, value },
            title: `show only ${field} ${value}`,
            onclick: () => setFilter(sel ? null : { field, value }),
          },
          el("span", {}, value),
          el("b", { class: "count" }, fmt(n)),
        );
      }),
    );
    if (!rows.length) ul.replaceChildren(el("li", { class: "muted" }, "none"));
  }

  function setFilter(f) {
    st.filter = f;
    renderBoard();
  }

  function exceptionRow(e, opts = {}) {
    return el(
      "li",
      { class: opts.fresh ? "new" : "", dataset: { id: e.id || "", key: e.key, kind: e.kind, rule: e.rule } },
      el("span", { class: `badge ${opts.status ? e.status : e.severity}` }, opts.status ? e.status : e.severity),
      el("button", { class: "key", type: "button", onclick: () => openEntity(e.kind, e.key) }, `${e.kind} ${e.key}`),
      el("span", { class: "msg" }, e.message || `${e.rule}${e.location ? " at " + e.location : ""}`),
      el("span", { class: "when", title: e.detected_at }, fmtTime(e.detected_at)),
    );
  }

  function renderBoard() {
    const all = [...st.open.values()];
    for (const f of GROUP_FIELDS) renderGroup(f);
    const shown = st.filter ? all.filter((e) => (e[st.filter.field] ?? "(none)") === st.filter.value) : all;
    shown.sort(
      (a, b) =>
        (SEVERITY_ORDER[a.severity] ?? 9) - (SEVERITY_ORDER[b.severity] ?? 9) ||
        String(b.detected_at).localeCompare(String(a.detected_at)) ||
        keyOf(a).localeCompare(keyOf(b)),
    );
    $("open-list").replaceChildren(...shown.slice(0, LIST_MAX).map((e) => exceptionRow(e)));
    if (!shown.length) $("open-list").replaceChildren(el("li", { class: "muted empty" }, "nothing open"));
    const more = $("open-more");
    more.hidden = shown.length <= LIST_MAX;
    more.textContent = `and ${fmt(shown.length - LIST_MAX)} more (narrow by a group above)`;
    const filter = $("filter");
    filter.hidden = !st.filter;
    if (st.filter) filter.firstElementChild.textContent = `${st.filter.field}: ${st.filter.value} (${fmt(shown.length)})`;
    let total = 0;
    for (const n of st.counts.values()) total += n;
    setText("c-open", fmt(total));
    $("board-note").textContent = [st.truncated ? `listing the first ${fmt(all.length)} of ${fmt(st.openTotal)}` : "",
      st.countsNote].filter(Boolean).join("; ");
  }

  // --- the live feed --------------------------------------------------------------------
  function onException(e) {
    if (!e || !e.kind || !e.key || !e.status) return;
    if (!st.loaded) st.pending.push(e);
    else applyException(e);
    const feed = $("feed");
    const empty = feed.querySelector(".empty");
    if (empty) empty.remove();
    feed.prepend(exceptionRow(e, { status: true, fresh: true }));
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
    scheduleBoard();
    if (st.entity && st.entity.kind === e.kind && st.entity.key === e.key) refreshEntitySoon();
  }

  // --- counters (the feed's `tick`, every second) ----------------------------------------
  function onTick(t) {
    if (!t || typeof t !== "object") return;
    const parts = Array.isArray(t.partitions) ? t.partitions : [];
    setText("c-events", fmtRate(Number(t.events_per_s) || 0));
    setText("c-exceptions", fmtRate(Number(t.exceptions_per_s) || 0));
    setText("c-lag", fmt(t.lag));
    $("c-lag-parts").textContent =
      parts.length > 1 ? parts.map((p) => `p${p.partition}: ${fmt(p.lag)}`).join("  ") : "";
    setText("c-actors", fmt(t.resident_actors));
    setText("c-snapshot", fmtAge(t.last_snapshot_age_s));
    // dead_letters counts this process's; a change reloads the list (and the stream's total).
    if (st.deadSeen !== undefined && t.dead_letters !== st.deadSeen) loadDeadSoon();
    st.deadSeen = t.dead_letters;
    st.asof = { seq: t.as_of_seq ?? 0, lag: t.lag ?? 0, status: t.status, ready: t.ready };
    st.statsAt = Date.now();
    renderAsOf();
  }

  function renderAsOf() {
    const a = $("asof");
    if (!st.asof) return;
    const age = (Date.now() - st.statsAt) / 1000;
    let text = `as of stream sequence ${fmt(st.asof.seq)}, lag ${fmt(st.asof.lag)}`;
    if (st.asof.status && st.asof.status !== "ok") text += ` (${st.asof.status})`;
    else if (st.asof.ready === false) text += " (catching up)";
    if (age >= STALE_S) text += ` (${fmtAge(age)} ago)`;
    a.textContent = text;
    a.dataset.seq = String(st.asof.seq);
    a.dataset.lag = String(st.asof.lag);
    a.classList.toggle("stale", age >= STALE_S && age < DEAD_S);
    a.classList.toggle("dead", age >= DEAD_S || !st.live);
  }

  async function checkOpenCount() {
    if (!st.loaded || st.truncated) return;
    const r = await getJSON("/exceptions/open?limit=1");
    let counted = 0;
    for (const n of st.counts.values()) counted += n;
    if (r.total !== st.open.size || (!st.countsNote && r.total !== counted)) resyncSoon();
  }

  let resyncTimer = null;
  function resyncSoon() {
    if (resyncTimer) return;
    resyncTimer = setTimeout(() => {
      resyncTimer = null;
      loadOpen().catch(showError);
    }, 1000);
  }

  // --- dead letters ---------------------------------------------------------------------
  let deadTimer = null;
  function loadDeadSoon() {
    if (deadTimer) return;
    deadTimer = setTimeout(() => {
      deadTimer = null;
      loadDead().catch(showError);
    }, 3000);
  }

  async function loadDead() {
    const r = await getJSON("/console/deadletters?limit=100");
    setText("c-dead", fmt(r.total));
    $("dead-note").textContent = r.total
      ? `${fmt(r.total)} in ${r.stream}; the latest ${fmt(r.items.length)} by reason`
      : `none in ${r.stream}`;
    $("dead-reasons").replaceChildren(
      ...Object.entries(r.by_reason || {}).map(([reason, n]) =>
        el("li", { dataset: { reason } }, el("span", {}, reason), " ", el("b", {}, fmt(n))),
      ),
    );
    $("dead-list").replaceChildren(
      ...(r.items || []).map((d) =>
        el(
          "li",
          { dataset: { number: d.number, reason: d.reason } },
          el("span", { class: "badge warning" }, d.reason),
          el("code", {}, `#${d.number}`),
          el("span", { class: "mono" }, d.subject),
          el("span", { class: "msg" }, d.detail),
          d.redriven ? el("span", { class: "badge cleared", title: `EVENTS seq ${d.redriven.seq}` }, "redriven") : null,
          el("span", { class: "when", title: d.time }, fmtTime(d.time)),
          el("code", { class: "msg muted" }, d.payload),
        ),
      ),
    );
    if (!r.items || !r.items.length) $("dead-list").replaceChildren(el("li", { class: "muted empty" }, "no dead letters"));
  }

  // --- search and drill-down ------------------------------------------------------------
  let entityTimer = null;
  function refreshEntitySoon() {
    if (entityTimer) return;
    entityTimer = setTimeout(() => {
      entityTimer = null;
      if (st.entity) openEntity(st.entity.kind, st.entity.key, { quiet: true }).catch(showError);
    }, 500);
  }

  function flatten(obj, prefix, out) {
    if (obj && typeof obj === "object" && !Array.isArray(obj) && Object.keys(obj).length) {
      for (const [k, v] of Object.entries(obj)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
    } else {
      out.push([prefix, Array.isArray(obj) ? obj.join(", ") || "[]" : obj === null ? "null" : typeof obj === "object" ? "{}" : String(obj)]);
    }
    return out;
  }
  function kvRows(table, rows) {
    table.replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
    if (!rows.length) table.replaceChildren(el("tr", {}, el("td", { class: "muted" }, "none")));
  }

  async function openEntity(kind, key, opts = {}) {
    key = String(key || "").trim();
    if (!key) return;
    const kinds = kind ? [kind] : KINDS;
    const panel = $("entity");
    let found = null;
    const seenIn = [];
    for (const k of kinds) {
      const r = await getJSON(`/state/${encodeURIComponent(k)}/${encodeURIComponent(key)}`);
      if (r.seq || r.state) {
        seenIn.push(k);
        if (!found) found = r;
      }
    }
    panel.hidden = false;
    st.entity = { kind: found ? found.kind : kinds[0], key };
    if (!opts.quiet) history.replaceState(null, "", `#${st.entity.kind}/${encodeURIComponent(key)}`);
    $("entity-title").textContent = `${st.entity.kind} ${key}`;
    panel.dataset.kind = st.entity.kind;
    panel.dataset.key = key;
    if (!found) {
      $("entity-note").textContent = `never seen: no ${kinds.join(" or ")} with key ${key}`;
      for (const id of ["entity-open", "entity-events", "entity-exceptions"]) $(id).replaceChildren();
      kvRows($("entity-state"), []);
      kvRows($("entity-settings"), []);
      if (!opts.quiet) panel.scrollIntoView({ behavior: "smooth", block: "start" });
      return;
    }
    const others = seenIn.filter((k) => k !== found.kind);
    $("entity-note").textContent =
      `last event applied: stream sequence ${fmt(found.seq)}` + (others.length ? `; also a ${others.join(", ")} with this key` : "");
    const state = found.state || {};
    const { settings, effective, ...rest } = state;
    kvRows($("entity-state"), flatten(rest, "", []));
    kvRows($("entity-settings"), [
      ...flatten(settings || {}, "set", []).filter(([k]) => k !== "set"),
      ...Object.entries(effective || {}).map(([name, e]) => [
        `effective.${name}`,
        e && typeof e === "object" ? `${e.value} (from ${e.from})` : String(e),
      ]),
    ]);
    const [open, hist] = await Promise.all([
      getJSON(`/exceptions/open?${new URLSearchParams({ kind: found.kind, key })}`),
      getJSON(`/console/history/${encodeURIComponent(found.kind)}/${encodeURIComponent(key)}?limit=20`),
    ]);
    $("entity-open").replaceChildren(...(open.open || []).map((e) => exceptionRow(e)));
    if (!(open.open || []).length) $("entity-open").replaceChildren(el("li", { class: "muted empty" }, "nothing open"));
    $("entity-events").replaceChildren(
      ...(hist.events || []).map((m) =>
        el(
          "li",
          { dataset: { seq: m.seq } },
          el("code", {}, `#${m.seq}`),
          el("b", {}, m.type || "?"),
          el("span", { class: "msg" }, m.payload),
          el("span", { class: "when", title: m.time }, fmtTime(m.time)),
        ),
      ),
    );
    if (!(hist.events || []).length) $("entity-events").replaceChildren(el("li", { class: "muted empty" }, "none in the stream"));
    $("entity-exceptions").replaceChildren(...(hist.exceptions || []).map((e) => exceptionRow(e, { status: true })));
    if (!(hist.exceptions || []).length)
      $("entity-exceptions").replaceChildren(el("li", { class: "muted empty" }, "none in the stream"));
    if (!opts.quiet) panel.scrollIntoView({ behavior: "smooth", block: "start" });
  }

  // --- the feed connection --------------------------------------------------------------
  function parse(ev) {
    try {
      return JSON.parse(ev.data);
    } catch {
      return null;
    }
  }
  function connect() {
    const es = new EventSource("/feed");
    const setLive = (on) => {
      st.live = on;
      const live = $("live");
      live.textContent = on ? "live" : "reconnecting";
      live.classList.toggle("on", on);
      live.classList.toggle("off", !on);
      renderAsOf();
    };
    let dropped = false;
    es.onopen = () => {
      setLive(true);
      if (dropped) loadOpen().catch(showError); // what was missed while away
      dropped = false;
    };
    es.onerror = () => {
      dropped = true;
      setLive(false);
    };
    // CONTRACT 3.1 payloads as `raise` and `clear`; the counters as `tick` (router/http/feed.py).
    for (const name of ["raise", "clear"]) es.addEventListener(name, (ev) => onException(parse(ev)));
    es.addEventListener("tick", (ev) => onTick(parse(ev)));
  }

  function showError(err) {
    console.error(err);
    $("board-note").textContent = `(${err.message || err})`;
  }

  function init() {
    $("search").addEventListener("submit", (ev) => {
      ev.preventDefault();
      openEntity($("search-kind").value, $("search-key").value).catch(showError);
    });
    $("entity-close").addEventListener("click", () => {
      $("entity").hidden = true;
      st.entity = null;
      history.replaceState(null, "", "#");
    });
    $("filter-clear").addEventListener("click", () => setFilter(null));
    connect();
    loadOpen().catch(showError);
    loadDead().catch(showError);
    // Freshness stays visible when nothing arrives: the marker ages and turns amber, then red.
    setInterval(renderAsOf, 1000);
    // The feed says what was raised and cleared, not what left the open set because its entity
    // finished (a delivered shipment, an ended campaign): compare the count now and then.
    setInterval(() => checkOpenCount().catch(() => {}), CHECK_OPEN_S * 1000);
    // `#sku/KEY` (what the page shares) or `#/sku/KEY` (links made before the two agreed).
    const m = /^#\/?(sku|shipment|campaign)\/(.+)$/.exec(window.location.hash);
    if (m) openEntity(m[1], decodeURIComponent(m[2])).catch(showError);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
