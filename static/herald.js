/*!
 * herald.js: the browser client for Herald (PROTOCOL.md v1). No dependencies, no build step.
 *
 *   <script src="/static/herald.js"></script>
 *   const client = new Herald.Client({ transport: "ws" });   // or "sse"
 *   client.on("connected", () => console.log("live"));
 *   client.subscribe("orders", (event) => console.log(event.offset, event.type, event.data));
 *   await client.publish("orders", "order.created", { id: 7 });
 *
 * Options: url (default location.origin), transport ("ws" | "sse"), token (a JWT),
 * getToken (async () => fresh JWT, called before every connection attempt), channels
 * (names to follow from the start), minDelay / maxDelay (reconnect backoff, ms),
 * credentials (fetch credentials mode, default "same-origin"), autoConnect (default true).
 * Without token or getToken the browser's session cookie identifies the user.
 *
 * Guarantees: each channel's events reach its handler in offset order, each at most once;
 * after any drop the client reconnects (exponential backoff, full jitter) and resumes every
 * channel from the last offset it delivered. When the server cannot replay what was
 * missed (history pruned), a "reset" event names the channel.
 *
 * Events (client.on / client.off): "connecting", "connected", "reconnecting", "resumed",
 * "closed", "idle" (SSE with no channels: nothing to stream), "state" (every change, with
 * the new state), "event" (every delivered event), "reset" ({channel}), "subscribed"
 * ({channel, offset, recovered}), "error" (a HeraldError: .code, .status, .channel),
 * "join" / "leave" ({channel, user: {id, username}}: on channels whose rule has presence on,
 * a user's first subscription opened / last one closed; not events, never replayed).
 * client.presence(channel) resolves to {channel, clients, users: [{id, username, connections}]}.
 */
(function (root) {
  "use strict";

  const VERSION = "1.0.0";
  const CHANNEL = /^[A-Za-z0-9_.:@-]{1,128}$/;
  const HISTORY_PAGE = 1000;
  // An unparseable Last-Event-ID makes the server send a "reset" for every channel right
  // after subscribing it (PROTOCOL §10, §6), with the channel's current offset. The client
  // sends it whenever it has no cursor for this channel set (a first stream, a transport
  // switch, a channel added or removed): each reset marks the moment that channel is live
  // and where it stands; the client reads what it missed from history (REST), holding live
  // events back until that is done.
  const RESYNC = "resync";
  const FATAL_SUBSCRIBE_CODES = new Set(["unauthorized", "forbidden", "validation_error", "not_found"]);

  class HeraldError extends Error {
    constructor(message, details) {
      super(message);
      this.name = "HeraldError";
      const { status = null, code = null, channel = null, problem = null } = details || {};
      this.status = status;
      this.code = code;
      this.channel = channel;
      this.problem = problem;
    }
  }

  class Emitter {
    constructor() {
      this._listeners = new Map();
    }

    on(name, fn) {
      if (!this._listeners.has(name)) this._listeners.set(name, new Set());
      this._listeners.get(name).add(fn);
      return this;
    }

    off(name, fn) {
      const set = this._listeners.get(name);
      if (set) {
        if (fn) set.delete(fn);
        else set.clear();
      }
      return this;
    }

    _emit(name, value) {
      const set = this._listeners.get(name);
      if (!set) return;
      for (const fn of [...set]) {
        try {
          fn(value);
        } catch (err) {
          reportError(err);
        }
      }
    }
  }

  function reportError(err) {
    if (typeof root.reportError === "function") root.reportError(err);
    else setTimeout(() => { throw err; });
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (_) {
      return null;
    }
  }

  class Client extends Emitter {
    constructor(options) {
      super();
      const opts = options || {};
      const origin = root.location ? root.location.origin : "";
      this.url = String(opts.url || origin).replace(/\/+$/, "");
      this.transport = opts.transport === "sse" ? "sse" : "ws";
      this.token = opts.token || null;
      this.getToken = typeof opts.getToken === "function" ? opts.getToken : null;
      this.minDelay = opts.minDelay != null ? opts.minDelay : 500;
      this.maxDelay = opts.maxDelay != null ? opts.maxDelay : 30000;
      this.credentials = opts.credentials || "same-origin";
      this.state = "new";
      this.user = undefined; // the WebSocket welcome's user ({id, username, roles} or null)

      this._subs = new Map(); // channel -> {handler, offset: last delivered or null, checking}
      this._gen = 0; // bumped whenever the current connection is abandoned: stale callbacks see it
      this._conn = null;
      this._timer = null;
      this._attempt = 0;
      this._hadConnection = false;
      this._started = false;
      this._closed = false;
      this._seq = 0;
      this._pending = new Map(); // WebSocket request id -> {resolve, reject}
      this._cursor = null; // the last SSE cursor, valid for the channel set in _cursorKey
      this._cursorKey = null;
      this._liveTimer = null;
      this._lastSeen = 0;
      this._reopenQueued = false;
      this._onOnline = () => {
        if (this._timer) this._reconnectNow();
      };

      const initial = opts.channels || [];
      for (const channel of Array.isArray(initial) ? initial : Object.keys(initial)) {
        this.subscribe(channel, Array.isArray(initial) ? null : initial[channel]);
      }
      if (opts.autoConnect !== false) Promise.resolve().then(() => this.connect());
    }

    // ---- public API -------------------------------------------------------------------

    /** Start (or restart after close()) connecting. Idempotent. */
    connect() {
      if (this._started && !this._closed) return this;
      this._started = true;
      this._closed = false;
      this._hadConnection = false;
      if (root.addEventListener) root.addEventListener("online", this._onOnline);
      this._open({ quiet: false });
      return this;
    }

    /** Follow a channel. `options.offset`: the last offset already seen (resume after it). */
    subscribe(channel, handler, options) {
      if (typeof channel !== "string" || !CHANNEL.test(channel)) {
        throw new HeraldError(`Invalid channel name: ${channel}`, { code: "validation_error", channel });
      }
      const existing = this._subs.get(channel);
      if (existing) {
        if (handler) existing.handler = handler;
        return this;
      }
      const offset = options && Number.isInteger(options.offset) ? options.offset : null;
      const sub = { handler: handler || null, offset, checking: false };
      this._subs.set(channel, sub);
      if (this.transport === "ws") {
        if (this._wsReady()) this._wsSubscribe(channel, sub);
      } else {
        this._checkSseAccess(channel, sub);
      }
      return this;
    }

    unsubscribe(channel) {
      const sub = this._subs.get(channel);
      if (!sub) return this;
      this._subs.delete(channel);
      if (this.transport === "ws") {
        if (this._wsReady()) this._request({ op: "unsubscribe", channel }).catch(() => {});
      } else if (!sub.checking) {
        this._sseChannelsChanged();
      }
      return this;
    }

    /** The followed channels and the last offset delivered for each (null: none yet). */
    subscriptions() {
      const out = {};
      for (const [channel, sub] of this._subs) out[channel] = sub.offset;
      return out;
    }

    /**
     * Publish an event; resolves to the stored event. Over the WebSocket when it is open,
     * else (SSE, not connected, or with options.idempotencyKey) through REST.
     */
    async publish(channel, type, data, options) {
      const opts = options || {};
      const body = { type: type || "message", data: data === undefined ? null : data };
      if (this.transport === "ws" && this._wsReady() && !opts.idempotencyKey) {
        const reply = await this._request({ op: "publish", channel, ...body });
        return reply.event;
      }
      const headers = opts.idempotencyKey ? { "Idempotency-Key": opts.idempotencyKey } : {};
      return this._rest("POST", `/api/channels/${encodeURIComponent(channel)}/events`, body, headers);
    }

    /**
     * Who is here on a presence channel: {channel, clients, users: [{id, username, connections}]}.
     * Over the open WebSocket (op "presence"), else GET /api/channels/{channel}/presence. Rejects
     * with a HeraldError: code "forbidden" (status 403 over REST) where presence is off.
     */
    async presence(channel) {
      if (this.transport === "ws" && this._wsReady()) {
        const reply = await this._request({ op: "presence", channel });
        return { channel: reply.channel, clients: reply.clients, users: reply.users };
      }
      return this._rest("GET", `/api/channels/${encodeURIComponent(channel)}/presence`);
    }

    _presenceChange(message) {
      if (this._subs.has(message.channel)) {
        this._emit(message.op, { channel: message.channel, user: message.user });
      }
    }

    /** Switch between "ws" and "sse": reconnects with the same channels and resumes them. */
    setTransport(transport) {
      const next = transport === "sse" ? "sse" : "ws";
      if (next === this.transport) return this;
      this._teardown();
      this._clearTimer();
      this.transport = next;
      this._cursor = null;
      this._cursorKey = null;
      if (next === "sse") {
        for (const sub of this._subs.values()) sub.checking = false;
      }
      if (this._started && !this._closed) {
        this._hadConnection = false;
        this._attempt = 0;
        this._open({ quiet: false });
      }
      return this;
    }

    close() {
      this._closed = true;
      this._teardown();
      this._clearTimer();
      if (root.removeEventListener) root.removeEventListener("online", this._onOnline);
      this._setState("closed");
    }

    // ---- connection lifecycle ------------------------------------------------------------

    async _open({ quiet }) {
      const gen = ++this._gen;
      if (this._closed) return;
      if (this.transport === "sse" && this._sseChannels().length === 0) {
        this._hadConnection = false;
        this._setState("idle");
        return;
      }
      if (!quiet && this.state !== "reconnecting") this._setState("connecting");
      let token;
      try {
        token = await this._connectToken();
      } catch (err) {
        if (gen !== this._gen) return;
        this._emit("error", asError(err, "Could not get a token", "token_error"));
        this._drop();
        return;
      }
      if (gen !== this._gen || this._closed) return;
      if (this.transport === "ws") this._openWs(gen, token);
      else this._openSse(gen, token);
    }

    _connected() {
      this._attempt = 0;
      this._setState(this._hadConnection ? "resumed" : "connected");
      this._hadConnection = true;
    }

    /** The connection is gone (or never came up): back off, then try again. */
    _drop() {
      this._teardown();
      if (this._closed) return;
      this._setState("reconnecting");
      this._clearTimer();
      const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** Math.min(this._attempt, 30));
      this._attempt += 1;
      const delay = Math.random() * ceiling; // full jitter
      this._timer = setTimeout(() => {
        this._timer = null;
        this._open({ quiet: false });
      }, delay);
    }

    _reconnectNow() {
      this._clearTimer();
      this._open({ quiet: false });
    }

    _clearTimer() {
      if (this._timer) clearTimeout(this._timer);
      this._timer = null;
    }

    /** Abandon the current connection without triggering any of its callbacks. */
    _teardown() {
      this._gen += 1;
      const conn = this._conn;
      this._conn = null;
      if (this._liveTimer) clearInterval(this._liveTimer);
      this._liveTimer = null;
      if (conn && conn.ws) {
        conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = conn.ws.onerror = null;
        try {
          conn.ws.close(1000);
        } catch (_) {
          /* already closed */
        }
      }
      if (conn && conn.es) {
        conn.es.onopen = conn.es.onmessage = conn.es.onerror = null;
        conn.es.close();
      }
      const pending = [...this._pending.values()];
      this._pending.clear();
      for (const p of pending) p.reject(new HeraldError("The connection closed", { code: "disconnected" }));
    }

    _setState(state) {
      if (state === this.state) return;
      this.state = state;
      this._emit(state, { state });
      this._emit("state", state);
    }

    async _connectToken() {
      if (this.getToken) this.token = await this.getToken();
      return this.token;
    }

    async _restToken() {
      if (!this.token && this.getToken) this.token = await this.getToken();
      return this.token;
    }

    // ---- delivery ------------------------------------------------------------------------

    _deliver(message) {
      const sub = this._subs.get(message.channel);
      if (!sub || !Number.isInteger(message.offset)) return;
      if (sub.offset !== null && message.offset <= sub.offset) return; // seen already
      sub.offset = message.offset;
      const event = {
        channel: message.channel,
        offset: message.offset,
        type: message.type,
        data: message.data,
        time: message.time,
      };
      if (sub.handler) {
        try {
          sub.handler(event);
        } catch (err) {
          reportError(err);
        }
      }
      this._emit("event", event);
    }

    _reset(channel) {
      this._emit("reset", { channel });
    }

    // ---- WebSocket (PROTOCOL §5) ---------------------------------------------------------

    _openWs(gen, token) {
      const base = this.url.replace(/^http/, "ws");
      const url = token ? `${base}/ws?access_token=${encodeURIComponent(token)}` : `${base}/ws`;
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (err) {
        this._emit("error", asError(err, "Could not open the WebSocket", "connect_error"));
        this._drop();
        return;
      }
      const conn = { ws, ready: false };
      this._conn = conn;
      ws.onmessage = (m) => {
        if (gen === this._gen) this._onWsMessage(gen, conn, m.data);
      };
      ws.onclose = (e) => {
        if (gen !== this._gen) return;
        if (e.code === 4401) {
          this._emit("error", new HeraldError("The token expired", { code: "unauthorized" }));
        } else if (e.code === 4403) {
          this._emit("error", new HeraldError("The user was removed or disabled", { code: "forbidden" }));
        }
        this._drop(); // getToken runs again before the next attempt
      };
    }

    _wsReady() {
      return Boolean(this._conn && this._conn.ws && this._conn.ready);
    }

    _onWsMessage(gen, conn, text) {
      const message = parseJson(text);
      if (!message || typeof message !== "object") return;
      this._lastSeen = Date.now();
      switch (message.op) {
        case "welcome":
          conn.ready = true;
          this.user = message.user;
          this._watchLiveness(gen, message.heartbeat);
          this._connected();
          for (const [channel, sub] of this._subs) this._wsSubscribe(channel, sub);
          break;
        case "event":
          this._deliver(message);
          break;
        case "join":
        case "leave":
          this._presenceChange(message);
          break;
        case "ok":
        case "error":
        case "pong": {
          const pending = this._pending.get(message.id);
          if (!pending) {
            // A late error for a subscribe already answered: its replay failed (the database
            // was away) and the server dropped that subscription. Reconnecting resumes it.
            if (message.op === "error" && message.code === "unavailable") this._drop();
            break;
          }
          this._pending.delete(message.id);
          if (message.op === "error") {
            pending.reject(new HeraldError(message.message || message.code, { code: message.code }));
          } else {
            pending.resolve(message);
          }
          break;
        }
        default:
          break;
      }
    }

    _request(message) {
      return new Promise((resolve, reject) => {
        if (!this._wsReady()) {
          reject(new HeraldError("Not connected", { code: "disconnected" }));
          return;
        }
        this._seq += 1;
        const id = this._seq;
        this._pending.set(id, { resolve, reject });
        this._conn.ws.send(JSON.stringify({ ...message, id }));
      });
    }

    _wsSubscribe(channel, sub) {
      const message = { op: "subscribe", channel };
      if (sub.offset !== null) message.offset = sub.offset;
      this._request(message).then(
        (reply) => {
          if (this._subs.get(channel) !== sub) return;
          if (reply.recovered === false) {
            sub.offset = reply.offset; // nothing is replayed; live events follow this offset
            this._reset(channel);
          } else if (sub.offset === null) {
            sub.offset = reply.offset;
          }
          this._emit("subscribed", { channel, offset: reply.offset, recovered: reply.recovered });
        },
        (err) => {
          if (err.code === "disconnected" || err.code === "conflict") return;
          err.channel = channel;
          if (FATAL_SUBSCRIBE_CODES.has(err.code) && this._subs.get(channel) === sub) this._subs.delete(channel);
          this._emit("error", err);
        },
      );
    }

    /** Browsers hide WebSocket pings; an app-level ping notices a silently dead connection. */
    _watchLiveness(gen, heartbeat) {
      const period = Math.max(1, Number(heartbeat) || 25) * 1000;
      if (this._liveTimer) clearInterval(this._liveTimer);
      this._liveTimer = setInterval(() => {
        if (gen !== this._gen) return;
        const quiet = Date.now() - this._lastSeen;
        if (quiet > 2 * period) this._drop();
        else if (quiet >= period) this._request({ op: "ping" }).catch(() => {});
      }, period / 2);
    }

    // ---- Server-Sent Events (PROTOCOL §6) ------------------------------------------------

    _sseChannels() {
      return [...this._subs].filter(([, sub]) => !sub.checking).map(([channel]) => channel).sort();
    }

    _openSse(gen, token) {
      const channels = this._sseChannels();
      const key = channels.join("\n");
      const params = new URLSearchParams();
      for (const channel of channels) params.append("channel", channel);
      if (token) params.set("access_token", token);
      // Without a cursor for this channel set, ask for a reset of every channel: it tells each
      // channel's position, also for one that has not had an event yet.
      params.set("last_event_id", this._cursor && this._cursorKey === key ? this._cursor : RESYNC);
      const es = new EventSource(`${this.url}/sse?${params}`, {
        withCredentials: this.credentials === "include",
      });
      const conn = { es, key, filling: new Map(), lastId: null };
      this._conn = conn;
      es.onopen = () => {
        if (gen === this._gen) this._connected();
      };
      es.onmessage = (m) => {
        if (gen === this._gen) this._onSseMessage(gen, conn, m);
      };
      // The browser would reconnect by itself after `retry`; closing it keeps backoff and
      // token refresh in our hands.
      es.onerror = () => {
        if (gen === this._gen) this._drop();
      };
    }

    _onSseMessage(gen, conn, m) {
      const message = parseJson(m.data);
      if (!message || typeof message !== "object") return;
      if (message.op === "reset") {
        this._sseReset(gen, conn, message.channel, message.offset);
        return;
      }
      if (message.op === "join" || message.op === "leave") {
        this._presenceChange(message);
        return;
      }
      if (message.op !== "event") return;
      if (m.lastEventId) conn.lastId = m.lastEventId;
      const fill = conn.filling.get(message.channel);
      if (fill) {
        fill.buffer.push(message);
        return;
      }
      this._deliver(message);
      this._saveCursor(conn);
    }

    /** A cursor is only as good as what was delivered: none while a gap is being filled. */
    _saveCursor(conn) {
      if (conn.lastId && conn.filling.size === 0) {
        this._cursor = conn.lastId;
        this._cursorKey = conn.key;
      }
    }

    _sseReset(gen, conn, channel, offset) {
      const sub = this._subs.get(channel);
      if (!sub) return;
      if (sub.offset === null) {
        // Nothing delivered yet: nothing to catch up on, but the reset says where the channel
        // stands, so a drop before its first event still resumes from here.
        if (Number.isInteger(offset)) sub.offset = offset;
        return;
      }
      this._cursor = null;
      const fill = { buffer: [] };
      conn.filling.set(channel, fill);
      this._readHistory(channel, sub.offset).then(
        (events) => {
          if (gen !== this._gen || this._subs.get(channel) !== sub) return;
          conn.filling.delete(channel);
          const first = events.length ? events[0] : fill.buffer[0];
          if (first && first.offset !== sub.offset + 1) {
            // History no longer reaches back (or the channel's offsets started over): as with a
            // WebSocket subscribe that answers recovered: false, nothing is replayed and live
            // events follow the channel's current end.
            sub.offset = events.length ? events[events.length - 1].offset : first.offset - 1;
            this._reset(channel);
          } else {
            for (const event of events) this._deliver(event);
          }
          for (const event of fill.buffer) this._deliver(event);
          this._saveCursor(conn);
        },
        (err) => {
          if (gen !== this._gen) return;
          this._emit("error", asError(err, "Could not read the channel's history", "history_error", channel));
          this._drop();
        },
      );
    }

    /** Every stored event of the channel after `after`, oldest first. */
    async _readHistory(channel, after) {
      const events = [];
      let next = after;
      for (;;) {
        const path = `/api/channels/${encodeURIComponent(channel)}/events?after=${next}&limit=${HISTORY_PAGE}`;
        const page = await this._rest("GET", path);
        events.push(...page.items);
        if (page.next === null || page.next === undefined || page.items.length === 0) return events;
        next = page.next;
      }
    }

    /** EventSource cannot tell why a stream was refused; ask history (same permission) first. */
    _checkSseAccess(channel, sub) {
      sub.checking = true;
      const path = `/api/channels/${encodeURIComponent(channel)}/events?limit=1`;
      this._rest("GET", path).then(
        () => true,
        (err) => {
          if (err.status === 401 || err.status === 403 || err.status === 422 || err.status === 404) {
            if (this._subs.get(channel) === sub) this._subs.delete(channel);
            err.channel = channel;
            this._emit("error", err);
            return false;
          }
          return true; // a network problem: let the stream try
        },
      ).then((ok) => {
        if (!sub.checking) return; // the transport changed meanwhile
        sub.checking = false;
        if (ok && this._subs.get(channel) === sub) this._sseChannelsChanged();
      });
    }

    /** Reopen the stream for the new channel set (batched), keeping the current state. */
    _sseChannelsChanged() {
      if (this.transport !== "sse" || !this._started || this._closed || this._timer) return;
      if (this._reopenQueued) return;
      this._reopenQueued = true;
      Promise.resolve().then(() => {
        this._reopenQueued = false;
        if (this.transport !== "sse" || this._closed || this._timer) return;
        const live = this.state === "connected" || this.state === "resumed";
        this._teardown();
        this._open({ quiet: live });
      });
    }

    // ---- REST ----------------------------------------------------------------------------

    async _rest(method, path, body, extraHeaders) {
      const headers = { Accept: "application/json", ...(extraHeaders || {}) };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const token = await this._restToken();
      if (token) headers.Authorization = `Bearer ${token}`;
      const response = await fetch(this.url + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: this.credentials,
        // Under the page's Referrer-Policy (no-referrer) the Fetch standard sends `Origin: null`
        // on a same-origin POST; the server refuses cookie-authenticated POSTs without a trusted
        // Origin. This policy makes every browser send the real one.
        referrerPolicy: "same-origin",
      });
      const payload = parseJson(await response.text());
      if (!response.ok) {
        const detail = payload && (payload.detail || payload.title);
        throw new HeraldError(detail || `HTTP ${response.status}`, {
          status: response.status,
          code: payload && payload.code,
          problem: payload,
        });
      }
      return payload;
    }
  }

  function asError(err, message, code, channel) {
    if (err instanceof HeraldError) {
      if (channel && !err.channel) err.channel = channel;
      return err;
    }
    const detail = err && err.message ? `${message}: ${err.message}` : message;
    return new HeraldError(detail, { code, channel });
  }

  const Herald = { Client, HeraldError, VERSION };
  root.Herald = Herald;
  if (typeof module === "object" && module.exports) module.exports = Herald;
})(typeof window !== "undefined" ? window : globalThis);
