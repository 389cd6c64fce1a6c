/* Herald dashboard: sign-in, channels, live feed, rates and publishing, on top of herald.js. */
(function () {
  "use strict";

  const FEED_LIMIT = 200;
  const CHART_SECONDS = 60;
  const CHART_HEIGHT = 70;
  const REFRESH_MS = 3000;
  const STATE_LOG_LIMIT = 30;
  const DATA_PREVIEW = 2000;
  const CHANNEL = /^[A-Za-z0-9_.:@-]{1,128}$/;
  const TRANSPORT_NAMES = { ws: "WebSocket", sse: "SSE" };
  const PRESENCE_SETTLE_MS = 150; // join/leave come in bursts: one presence query per burst

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const app = {
    user: null,
    client: null,
    channels: new Map(), // name -> {name, last_offset, subscribers} from GET /api/channels
    followed: new Set(),
    rates: new Map(), // channel -> Map(second -> count)
    presenceOff: new Set(), // followed channels whose presence query was refused (presence off)
    presenceTimers: new Map(), // channel -> pending refresh after a join/leave
    refreshTimer: null,
    chartTimer: null,
  };

  // ---- HTTP ----------------------------------------------------------------------------

  async function api(method, path, body) {
    const init = {
      method,
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      // Under the page's Referrer-Policy (no-referrer) the Fetch standard sends `Origin: null`
      // on a same-origin POST; the server needs the real Origin for cookie POSTs.
      referrerPolicy: "same-origin",
    };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      return { ok: false, status: 0, payload: { detail: `Network error: ${err.message}` } };
    }
    const text = await response.text();
    let payload = null;
    if (text) {
      try {
        payload = JSON.parse(text);
      } catch (_) {
        payload = { detail: text };
      }
    }
    return { ok: response.ok, status: response.status, payload };
  }

  function problemText(result, fallback) {
    const p = result.payload || {};
    return p.detail || p.title || fallback;
  }

  // ---- preferences (per user, in localStorage) -----------------------------------------

  function prefsKey() {
    return `herald.dashboard.${app.user ? app.user.username : ""}`;
  }

  function loadPrefs() {
    try {
      const saved = JSON.parse(localStorage.getItem(prefsKey()) || "{}");
      return {
        transport: saved.transport === "sse" ? "sse" : "ws",
        channels: Array.isArray(saved.channels) ? saved.channels.filter((c) => CHANNEL.test(c)) : [],
      };
    } catch (_) {
      return { transport: "ws", channels: [] };
    }
  }

  function savePrefs() {
    try {
      localStorage.setItem(
        prefsKey(),
        JSON.stringify({ transport: $("transport").value, channels: [...app.followed] }),
      );
    } catch (_) {
      /* storage disabled: preferences last for this page only */
    }
  }

  // ---- sign-in -------------------------------------------------------------------------

  function showLogin(message) {
    $("session").hidden = true;
    $("dashboard").hidden = true;
    $("login-section").hidden = false;
    showError($("login-error"), message);
    $("username").focus();
  }

  function showError(node, message) {
    node.textContent = message || "";
    node.hidden = !message;
  }

  async function onLogin(e) {
    e.preventDefault();
    const button = $("login-submit");
    button.disabled = true;
    showError($("login-error"), "");
    const result = await api("POST", "/api/auth/login", {
      username: $("username").value,
      password: $("password").value,
    });
    button.disabled = false;
    if (!result.ok) {
      showError($("login-error"), problemText(result, "Sign-in failed"));
      return;
    }
    $("password").value = "";
    showDashboard(result.payload.user);
  }

  async function onLogout() {
    const result = await api("POST", "/api/auth/logout");
    stopDashboard();
    // 401: the session had already ended, which is what signing out wants.
    showLogin(result.ok || result.status === 401 ? "" : `Signing out failed: ${problemText(result, "error")}`);
  }

  // ---- dashboard -----------------------------------------------------------------------

  function canPublish(user) {
    return user.roles.includes("publisher") || user.roles.includes("admin");
  }

  function showDashboard(user) {
    app.user = user;
    $("login-section").hidden = true;
    $("dashboard").hidden = false;
    $("session").hidden = false;
    $("user").textContent = `${user.username} · ${user.roles.join(", ") || "no roles"}`;
    $("publish-section").hidden = !canPublish(user);

    const prefs = loadPrefs();
    $("transport").value = prefs.transport;
    const client = new Herald.Client({ url: location.origin, transport: prefs.transport });
    app.client = client;
    client.on("state", onState);
    client.on("event", onEvent);
    client.on("reset", ({ channel }) => {
      addNotice(`${channel}: the server no longer has every event since the last one shown; some were missed.`);
    });
    client.on("error", onClientError);
    client.on("join", ({ channel }) => schedulePresence(channel));
    client.on("leave", ({ channel }) => schedulePresence(channel));
    client.on("connected", refreshAllPresence);
    client.on("resumed", refreshAllPresence);
    for (const channel of prefs.channels) follow(channel);

    refreshChannels();
    app.refreshTimer = setInterval(refreshChannels, REFRESH_MS);
    app.chartTimer = setInterval(drawCharts, 1000);
  }

  function stopDashboard() {
    if (app.client) app.client.close();
    app.client = null;
    clearInterval(app.refreshTimer);
    clearInterval(app.chartTimer);
    app.user = null;
    app.followed.clear();
    app.rates.clear();
    app.channels.clear();
    app.presenceOff.clear();
    for (const timer of app.presenceTimers.values()) clearTimeout(timer);
    app.presenceTimers.clear();
    $("charts").replaceChildren();
    $("feed").replaceChildren();
    $("channels").replaceChildren();
    $("state-log").replaceChildren();
    updateFeedCount();
    updateChartsEmpty();
  }

  function onState(state) {
    const badge = $("state");
    badge.textContent = state;
    badge.dataset.state = state;
    const transport = app.client ? TRANSPORT_NAMES[app.client.transport] : "";
    logConnection(state, transport);
  }

  function logConnection(state, detail) {
    const log = $("state-log");
    const item = el("li");
    item.dataset.state = state;
    const now = new Date();
    const time = el("time", "", clock(now));
    time.dateTime = now.toISOString();
    item.append(time, el("span", "", state));
    if (detail) item.append(el("span", "muted", detail));
    log.prepend(item);
    while (log.children.length > STATE_LOG_LIMIT) log.lastElementChild.remove();
  }

  function onClientError(err) {
    if (err.channel && app.client && !(err.channel in app.client.subscriptions())) {
      unfollow(err.channel, { keepClient: true });
      showError($("subscribe-error"), `${err.channel}: ${err.message}`);
      return;
    }
    logConnection("error", err.message);
  }

  // ---- channels ------------------------------------------------------------------------

  async function refreshChannels() {
    const result = await api("GET", "/api/channels?limit=1000");
    if (!app.user) return;
    if (result.status === 401) {
      stopDashboard();
      showLogin("Your session has ended; please sign in again.");
      return;
    }
    if (!result.ok) return;
    app.channels = new Map(result.payload.items.map((c) => [c.name, c]));
    $("channels-updated").textContent = `updated ${clock(new Date()).slice(0, 8)}`;
    renderChannels();
    refreshAllPresence();
  }

  function renderChannels() {
    const names = new Set([...app.channels.keys(), ...app.followed]);
    const rows = [...names].sort().map((name) => {
      const info = app.channels.get(name);
      const row = el("tr");
      row.dataset.channel = name;
      const toggle = el("button", "small", app.followed.has(name) ? "Unsubscribe" : "Subscribe");
      toggle.type = "button";
      toggle.dataset.testid = `toggle-${name}`;
      toggle.dataset.channel = name;
      toggle.setAttribute("aria-pressed", String(app.followed.has(name)));
      const action = el("td");
      action.append(toggle);
      row.append(
        el("td", "name", name),
        el("td", "num last-offset", info ? String(info.last_offset) : "–"),
        el("td", "num subscribers", info && info.subscribers !== null ? String(info.subscribers) : "–"),
        action,
      );
      return row;
    });
    $("channels").replaceChildren(...rows);
    $("channels-empty").hidden = rows.length > 0;
    const options = [...names].sort().map((name) => {
      const option = el("option");
      option.value = name;
      return option;
    });
    $("channel-options").replaceChildren(...options);
  }

  function onChannelsClick(e) {
    const button = e.target.closest("button[data-channel]");
    if (!button) return;
    const channel = button.dataset.channel;
    if (app.followed.has(channel)) unfollow(channel);
    else follow(channel);
  }

  function onSubscribeSubmit(e) {
    e.preventDefault();
    const input = $("subscribe-input");
    const channel = input.value.trim();
    if (!CHANNEL.test(channel)) {
      showError($("subscribe-error"), "A channel name is 1 to 128 characters of letters, digits and _ . : @ -");
      return;
    }
    showError($("subscribe-error"), "");
    input.value = "";
    follow(channel);
  }

  function follow(channel) {
    if (app.followed.has(channel) || !app.client) return;
    app.followed.add(channel);
    app.client.subscribe(channel);
    app.rates.set(channel, new Map());
    addChart(channel);
    refreshPresence(channel);
    if (!$("publish-channel").value) $("publish-channel").value = channel;
    savePrefs();
    renderChannels();
  }

  function unfollow(channel, options) {
    if (!app.followed.has(channel)) return;
    app.followed.delete(channel);
    if (app.client && !(options && options.keepClient)) app.client.unsubscribe(channel);
    app.rates.delete(channel);
    app.presenceOff.delete(channel);
    const chart = $("charts").querySelector(`[data-channel="${CSS.escape(channel)}"]`);
    if (chart) chart.remove();
    updateChartsEmpty();
    savePrefs();
    renderChannels();
  }

  // ---- feed ----------------------------------------------------------------------------

  function onEvent(event) {
    addFeedRow(event);
    const second = Math.floor(Date.now() / 1000);
    const counts = app.rates.get(event.channel);
    if (counts) {
      counts.set(second, (counts.get(second) || 0) + 1);
      scheduleDraw();
    }
    const info = app.channels.get(event.channel);
    if (!info) {
      // A channel's first events: show them before the next refresh lists it.
      app.channels.set(event.channel, { name: event.channel, last_offset: event.offset, subscribers: null });
      renderChannels();
    } else if (event.offset > info.last_offset) {
      info.last_offset = event.offset;
      const cell = $("channels").querySelector(`tr[data-channel="${CSS.escape(event.channel)}"] .last-offset`);
      if (cell) cell.textContent = String(event.offset);
    }
  }

  function addFeedRow(event) {
    const row = el("li", "event");
    row.dataset.channel = event.channel;
    row.dataset.offset = String(event.offset);
    row.dataset.type = event.type;
    row.dataset.testid = "event";
    const when = new Date(event.time);
    const time = el("time", "time", Number.isNaN(when.getTime()) ? String(event.time) : clock(when));
    time.dateTime = String(event.time);
    let data = JSON.stringify(event.data);
    if (data === undefined) data = "null";
    if (data.length > DATA_PREVIEW) data = `${data.slice(0, DATA_PREVIEW)}…`;
    row.append(
      time,
      el("span", "channel", event.channel),
      el("span", "offset", `#${event.offset}`),
      el("span", "type", event.type),
      el("pre", "data", data),
    );
    row.hidden = !matchesFilter(row);
    prependToFeed(row);
  }

  function addNotice(text) {
    const row = el("li", "notice", text);
    row.dataset.testid = "notice";
    prependToFeed(row);
  }

  function prependToFeed(row) {
    const feed = $("feed");
    feed.prepend(row);
    while (feed.children.length > FEED_LIMIT) feed.lastElementChild.remove();
    updateFeedCount();
  }

  function filterText() {
    return $("feed-filter").value.trim().toLowerCase();
  }

  function matchesFilter(row) {
    const filter = filterText();
    return !filter || !row.dataset.type || row.dataset.type.toLowerCase().includes(filter);
  }

  function applyFilter() {
    for (const row of $("feed").children) row.hidden = !matchesFilter(row);
    updateFeedCount();
  }

  function updateFeedCount() {
    const rows = $("feed").querySelectorAll("li.event");
    const shown = [...rows].filter((r) => !r.hidden).length;
    $("feed-count").textContent =
      shown === rows.length ? `${rows.length} events` : `${shown} of ${rows.length} events`;
  }

  function clock(date) {
    const pad = (n, w) => String(n).padStart(w || 2, "0");
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
  }

  // ---- presence: who is here, on channels whose rule has it on ---------------------------

  function refreshAllPresence() {
    for (const channel of app.followed) refreshPresence(channel);
  }

  function schedulePresence(channel) {
    if (app.presenceTimers.has(channel)) return;
    app.presenceTimers.set(
      channel,
      setTimeout(() => {
        app.presenceTimers.delete(channel);
        refreshPresence(channel);
      }, PRESENCE_SETTLE_MS),
    );
  }

  async function refreshPresence(channel) {
    const client = app.client;
    if (!client || !app.followed.has(channel) || app.presenceOff.has(channel)) return;
    try {
      const body = await client.presence(channel);
      if (app.client === client && app.followed.has(channel)) renderPresence(channel, body);
    } catch (err) {
      // Presence off (or not allowed) is 403: nothing to show, and no point asking again.
      if (err.code === "forbidden" || err.status === 403) app.presenceOff.add(channel);
    }
  }

  function renderPresence(channel, body) {
    const card = $("charts").querySelector(`[data-channel="${CSS.escape(channel)}"]`);
    if (!card) return;
    const box = card.querySelector(".presence");
    const users = body.users.map((user) => {
      const item = el("li", "presence-user", user.username);
      item.dataset.testid = "presence-user";
      item.dataset.user = user.id;
      item.title = `${user.username} (id ${user.id}): ${user.connections} connection${user.connections === 1 ? "" : "s"}`;
      if (user.connections > 1) item.append(el("span", "muted", ` ×${user.connections}`));
      return item;
    });
    const anonymous = body.clients - body.users.reduce((n, user) => n + user.connections, 0);
    let count = `Here: ${body.users.length} user${body.users.length === 1 ? "" : "s"}`;
    if (anonymous > 0) count += ` + ${anonymous} anonymous`;
    box.querySelector(".presence-count").textContent = count;
    box.querySelector(".presence-users").replaceChildren(...users);
    box.hidden = false;
  }

  // ---- rate charts ---------------------------------------------------------------------

  function addChart(channel) {
    const card = el("div", "chart");
    card.dataset.channel = channel;
    card.dataset.testid = `chart-${channel}`;
    const head = el("div", "chart-head");
    const close = el("button", "small secondary", "×");
    close.type = "button";
    close.title = `Unsubscribe from ${channel}`;
    close.setAttribute("aria-label", `Unsubscribe from ${channel}`);
    close.addEventListener("click", () => unfollow(channel));
    head.append(el("span", "chart-name", channel), el("span", "chart-rate", "0 ev/s"), close);
    const canvas = el("canvas");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `Events per second on ${channel}, last 60 seconds`);
    const here = el("div", "presence");
    here.dataset.testid = `presence-${channel}`;
    here.hidden = true; // shown once the server says this channel has presence
    here.append(el("span", "presence-count muted"), el("ul", "presence-users"));
    card.append(head, canvas, here);
    $("charts").append(card);
    updateChartsEmpty();
    drawChart(card, app.rates.get(channel), Math.floor(Date.now() / 1000));
  }

  function updateChartsEmpty() {
    $("charts-empty").hidden = $("charts").children.length > 0;
  }

  let drawQueued = false;

  /** Redraw on the next frame (at most once per frame), not only on the one-second tick. */
  function scheduleDraw() {
    if (drawQueued) return;
    drawQueued = true;
    requestAnimationFrame(() => {
      drawQueued = false;
      drawCharts();
    });
  }

  function drawCharts() {
    const now = Math.floor(Date.now() / 1000);
    for (const card of $("charts").children) {
      const counts = app.rates.get(card.dataset.channel);
      if (!counts) continue;
      for (const second of counts.keys()) if (second <= now - CHART_SECONDS) counts.delete(second);
      drawChart(card, counts, now);
    }
  }

  function drawChart(card, counts, now) {
    const canvas = card.querySelector("canvas");
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.round(CHART_HEIGHT * ratio);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const values = [];
    for (let s = now - CHART_SECONDS + 1; s <= now; s += 1) values.push((counts && counts.get(s)) || 0);
    const peak = Math.max(1, ...values);
    const colors = getComputedStyle(document.documentElement);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const top = 14 * ratio;
    const plot = height - top - 2 * ratio;
    ctx.strokeStyle = colors.getPropertyValue("--chart-grid").trim() || "#ddd";
    ctx.lineWidth = ratio;
    ctx.beginPath();
    ctx.moveTo(0, top);
    ctx.lineTo(width, top);
    ctx.moveTo(0, height - ratio);
    ctx.lineTo(width, height - ratio);
    ctx.stroke();
    ctx.fillStyle = colors.getPropertyValue("--chart-bar").trim() || "#4c6ef5";
    const step = width / CHART_SECONDS;
    values.forEach((v, i) => {
      if (!v) return;
      const h = Math.max(ratio, (v / peak) * plot);
      ctx.fillRect(i * step + ratio / 2, height - ratio - h, Math.max(ratio, step - ratio), h);
    });
    ctx.fillStyle = colors.getPropertyValue("--chart-text").trim() || "#666";
    ctx.font = `${11 * ratio}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    ctx.fillText(`peak ${peak}/s`, 2 * ratio, 0);
    const last = values[values.length - 2] || 0; // the last whole second
    card.querySelector(".chart-rate").textContent = `${last} ev/s`;
  }

  // ---- publishing ----------------------------------------------------------------------

  async function onPublish(e) {
    e.preventDefault();
    const result = $("publish-result");
    const channel = $("publish-channel").value.trim();
    const type = $("publish-type").value.trim() || "message";
    const raw = $("publish-data").value.trim();
    let data = null;
    if (raw) {
      try {
        data = JSON.parse(raw);
      } catch (_) {
        showResult(result, "Data is not valid JSON.", false);
        return;
      }
    }
    const button = $("publish-submit");
    button.disabled = true;
    try {
      const event = await app.client.publish(channel, type, data);
      showResult(result, `Published ${event.channel} #${event.offset} (${event.type})`, true);
    } catch (err) {
      showResult(result, err.message || "Publishing failed", false);
    } finally {
      button.disabled = false;
    }
  }

  function showResult(node, text, ok) {
    node.textContent = text;
    node.className = `result ${ok ? "ok" : "bad"}`;
    node.hidden = false;
  }

  // ---- start ---------------------------------------------------------------------------

  async function start() {
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", onLogout);
    $("subscribe-form").addEventListener("submit", onSubscribeSubmit);
    $("channels").addEventListener("click", onChannelsClick);
    $("publish-form").addEventListener("submit", onPublish);
    $("feed-filter").addEventListener("input", applyFilter);
    $("feed-clear").addEventListener("click", () => {
      $("feed").replaceChildren();
      updateFeedCount();
    });
    window.addEventListener("resize", scheduleDraw);
    $("transport").addEventListener("change", () => {
      if (app.client) app.client.setTransport($("transport").value);
      savePrefs();
    });
    updateFeedCount();
    const me = await api("GET", "/api/me");
    if (me.ok) showDashboard(me.payload);
    else showLogin();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
