// Post Office chat page: one WebSocket to the gateway's /ws, the protocol of docs/protocol.md.
// No framework and no build step; every string from the network is rendered with textContent.
(() => {
  "use strict";

  // Why each close code happens, and whether reconnecting can help (docs/protocol.md).
  const CLOSE_CODES = {
    1000: { text: "The server closed the connection normally.", reconnect: false,
            why: "it was closed on purpose, so the page does not reopen it; press Connect to start again." },
    1001: { text: "The server is restarting or shutting down (going away).", reconnect: true },
    1005: { text: "The connection closed without a status code.", reconnect: true },
    1006: { text: "The connection was lost without a proper close: the network dropped, or the " +
                  "server refused or could not take the connection.", reconnect: true },
    1008: { text: "The server disconnected this page: it was evicted as idle or stale.", reconnect: false,
            why: "an evicted connection is not reopened automatically; press Connect when you are back." },
    1009: { text: "A message was too large for the server, so it closed the connection.", reconnect: true },
    1011: { text: "The server hit an internal error.", reconnect: true },
    1013: { text: "The server is overloaded, or this page read its messages too slowly.", reconnect: true,
            minDelay: 5000 },
    4401: { text: "The session is not valid: the token is wrong, expired or was revoked.", reconnect: false,
            why: "the same token would be refused again; get a new session token and press Connect." },
    4429: { text: "Too many messages: the rate limit was exceeded repeatedly.", reconnect: false,
            why: "reconnecting at once would hit the limit again; wait a moment, then press Connect." },
  };
  // One close code, two causes: the gateway tells them apart by the close reason
  // (shared/protocol.py CLOSE_REASON_*). Keyed "code:reason"; the code's entry is the fallback.
  const CLOSE_REASONS = {
    "4429:too many connections for this session": {
      text: "Too many connections: this session already holds the most sockets one gateway " +
            "allows (other tabs or windows with the same token).", reconnect: false,
      why: "close another tab or window that uses this session, or get a new session token, " +
           "then press Connect." },
  };
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 30000;
  // A connection that stayed up this long resets the backoff: the next failure is a new incident.
  const STABLE_MS = 10000;
  const TOKEN_STORE_KEY = "postoffice.session_token";

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"), statusText: $("status-text"), notice: $("notice"),
    connectForm: $("connect-form"), token: $("token"), connect: $("connect"),
    disconnect: $("disconnect"), conversation: $("conversation"), empty: $("empty-hint"),
    compose: $("compose"), channel: $("channel"), intent: $("intent"),
    message: $("message"), send: $("send"),
  };

  const state = {
    ws: null,
    attempt: 0,             // consecutive failed or short-lived connections
    reconnectTimer: null,
    countdownTimer: null,
    watchdog: null,
    heartbeatMs: 30000,
    openedAt: 0,
    welcomed: false,
    userClosed: false,
    localReason: "",        // set when the page itself closes the socket (heartbeat lost)
    nextId: 1,
    pending: new Map(),     // client id -> {item, text}
    byMessageId: new Map(), // server message_id -> {item, text}
    conversationId: randomId(),
  };

  function randomId() {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return "conv_" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function wsUrl(token) {
    const path = document.body.dataset.wsPath || "/ws";
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}${path}?session_token=${encodeURIComponent(token)}`;
  }

  // ---- status and notices -------------------------------------------------------------------

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    document.body.dataset.state = kind;
    el.statusText.textContent = text;
  }

  function showNotice(text, kind) {
    el.notice.textContent = text;
    el.notice.dataset.kind = kind || "info";
    el.notice.hidden = !text;
  }

  function setComposerEnabled(enabled) {
    for (const c of [el.channel, el.intent, el.message, el.send]) c.disabled = !enabled;
    if (enabled) updateSendButton();
  }

  function updateSendButton() {
    el.send.disabled = !(state.welcomed && el.message.value.trim());
  }

  // ---- conversation ------------------------------------------------------------------------

  function addItem(kind, label) {
    if (el.empty) { el.empty.remove(); el.empty = null; }
    const item = document.createElement("li");
    item.className = `msg ${kind}`;
    const head = document.createElement("p");
    head.className = "who";
    head.textContent = label;
    const body = document.createElement("p");
    body.className = "body";
    item.append(head, body);
    el.conversation.append(item);
    return { item, body };
  }

  function scrollToEnd() {
    el.conversation.scrollTop = el.conversation.scrollHeight;
  }

  function setAck(entry, status, detail) {
    let badge = entry.item.querySelector(".ack");
    if (!badge) {
      badge = document.createElement("p");
      badge.className = "ack";
      entry.item.append(badge);
    }
    badge.dataset.status = status;
    badge.textContent = detail ? `${status}: ${detail}` : status;
  }

  function addOwnMessage(text, channel, intent) {
    const { item, body } = addItem("own", `You · ${channel}${intent === "chat" ? "" : " · " + intent}`);
    body.textContent = text;
    return { item, text };
  }

  function addAgentMessage(frame) {
    const original = frame.in_reply_to ? state.byMessageId.get(frame.in_reply_to) : undefined;
    const who = frame.agent_type ? `${frame.agent_type} agent` : "agent";
    const { item, body } = addItem("agent", who);
    body.textContent = typeof frame.message === "string" ? frame.message : JSON.stringify(frame, null, 2);
    if (original) {
      const quote = document.createElement("p");
      quote.className = "reply-to";
      quote.textContent = `in reply to “${truncate(original.text, 60)}”`;
      item.insertBefore(quote, body);
      original.item.classList.add("answered");
    } else if (frame.in_reply_to) {
      item.dataset.inReplyTo = frame.in_reply_to;
    }
    scrollToEnd();
  }

  function addSystem(text) {
    const { body } = addItem("system", "gateway");
    body.textContent = text;
    scrollToEnd();
  }

  function truncate(text, n) {
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }

  // ---- protocol ----------------------------------------------------------------------------

  function connect() {
    const token = el.token.value.trim();
    if (!token) {
      showNotice("Enter a session token first.", "error");
      el.token.focus();
      return;
    }
    clearReconnect();
    if (state.ws) return;
    try { sessionStorage.setItem(TOKEN_STORE_KEY, token); } catch (_) { /* storage disabled */ }
    state.userClosed = false;
    state.localReason = "";
    state.welcomed = false;
    setStatus("connecting", state.attempt ? `Connecting (attempt ${state.attempt + 1})…` : "Connecting…");
    el.connect.disabled = true;
    el.disconnect.disabled = false;
    let ws;
    try {
      ws = new WebSocket(wsUrl(token));
    } catch (err) {
      setStatus("closed", "Could not open the WebSocket");
      showNotice(String(err), "error");
      el.connect.disabled = false;
      return;
    }
    state.ws = ws;
    ws.addEventListener("open", () => { state.openedAt = Date.now(); armWatchdog(); });
    ws.addEventListener("message", (event) => onFrame(ws, event.data));
    ws.addEventListener("close", (event) => onClose(ws, event));
  }

  function onFrame(ws, data) {
    if (ws !== state.ws) return;
    armWatchdog();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (_) {
      addSystem(`Unreadable frame from the server: ${truncate(String(data), 200)}`);
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
      addSystem(`Unexpected frame: ${truncate(String(data), 200)}`);
      return;
    }
    switch (frame.type) {
      case "welcome": return onWelcome(frame);
      case "ping": return ws.send('{"type":"pong"}');
      case "ack": return onAck(frame);
      case "error": return onError(frame);
      case "response": return addAgentMessage(frame);
      default:
        // Agents may deliver any JSON object; show its text when it has one.
        if (typeof frame.message === "string") return addAgentMessage(frame);
        addSystem(JSON.stringify(frame, null, 2));
    }
  }

  function onWelcome(frame) {
    state.welcomed = true;
    if (Number(frame.heartbeat_interval) > 0) state.heartbeatMs = Number(frame.heartbeat_interval) * 1000;
    const previous = el.channel.value;
    el.channel.replaceChildren(...(frame.channels || ["guide"]).map((c) => new Option(c, c)));
    if ([...el.channel.options].some((o) => o.value === previous)) el.channel.value = previous;
    el.status.dataset.connectionId = frame.connection_id || "";
    setStatus("connected", `Connected as ${frame.user_id} · connection ${frame.connection_id}`);
    showNotice("");
    setComposerEnabled(true);
    el.message.focus();
  }

  function onAck(frame) {
    const entry = state.pending.get(frame.id);
    if (!entry) return;
    state.pending.delete(frame.id);
    state.byMessageId.set(frame.message_id, entry);
    entry.item.dataset.messageId = frame.message_id;
    setAck(entry, frame.status,
      frame.status === "queued" ? "no agent is listening now; it will be delivered when one is" : "");
  }

  function onError(frame) {
    const entry = frame.id !== null && frame.id !== undefined ? state.pending.get(frame.id) : undefined;
    if (entry) {
      state.pending.delete(frame.id);
      entry.item.classList.add("refused");
      setAck(entry, "error", `${frame.code}: ${frame.message}`);
    } else {
      addSystem(`Error ${frame.code}: ${frame.message}`);
    }
  }

  function send() {
    const text = el.message.value.trim();
    if (!text || !state.ws || !state.welcomed || state.ws.readyState !== WebSocket.OPEN) return;
    const id = `c${state.nextId++}`;
    const channel = el.channel.value || "guide";
    const intent = el.intent.value || "chat";
    const entry = addOwnMessage(text, channel, intent);
    entry.item.dataset.clientId = id;
    setAck(entry, "sending", "");
    state.pending.set(id, entry);
    state.ws.send(JSON.stringify({
      id, channel, intent, payload: { message: text, conversation_id: state.conversationId },
    }));
    el.message.value = "";
    updateSendButton();
    scrollToEnd();
  }

  function armWatchdog() {
    clearTimeout(state.watchdog);
    // The server pings every heartbeat interval; two missed pings means the path is dead even
    // if TCP has not noticed yet.
    state.watchdog = setTimeout(() => {
      if (!state.ws) return;
      state.localReason = "no heartbeat from the server";
      state.ws.close(4000, "heartbeat lost");
    }, state.heartbeatMs * 2 + 5000);
  }

  function onClose(ws, event) {
    if (ws !== state.ws) return;
    state.ws = null;
    clearTimeout(state.watchdog);
    setComposerEnabled(false);
    el.connect.disabled = false;
    el.disconnect.disabled = true;
    const welcomed = state.welcomed;
    state.welcomed = false;
    for (const entry of state.pending.values()) {
      setAck(entry, "unconfirmed", "the connection closed before the server acknowledged it; send it again");
    }
    state.pending.clear();

    const code = event.code;
    const reason = event.reason ? ` (reason: ${event.reason})` : "";
    if (state.userClosed) {
      setStatus("closed", "Disconnected");
      showNotice("You disconnected. Press Connect to start again.", "info");
      return;
    }
    const known = state.localReason
      ? { text: `The page closed the connection: ${state.localReason}.`, reconnect: true }
      : CLOSE_REASONS[`${code}:${event.reason}`] || CLOSE_CODES[code] ||
        { text: "The connection closed for a reason this page does not know.", reconnect: code < 4000,
          why: "an application close code it does not know is treated as final; press Connect to retry." };
    const summary = `Closed with code ${code}${reason}. ${known.text}`;
    setStatus("closed", `Closed · code ${code}`);
    if (!known.reconnect) {
      state.attempt = 0;
      showNotice(`${summary} Not reconnecting: ${known.why}`, "error");
      return;
    }
    const lived = state.openedAt && welcomed ? Date.now() - state.openedAt : 0;
    if (lived >= STABLE_MS) state.attempt = 0;
    scheduleReconnect(summary, known.minDelay || 0);
  }

  function scheduleReconnect(summary, minDelay) {
    // Full jitter: many tabs dropped by one gateway restart do not come back in lockstep.
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = Math.max(minDelay, Math.round(Math.random() * ceiling));
    state.attempt += 1;
    const due = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      showNotice(`${summary} Reconnecting in ${left} s…`, "warn");
    };
    tick();
    state.countdownTimer = setInterval(tick, 1000);
    state.reconnectTimer = setTimeout(() => { clearReconnect(); connect(); }, delay);
  }

  function clearReconnect() {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    state.reconnectTimer = state.countdownTimer = null;
  }

  function disconnect() {
    clearReconnect();
    state.attempt = 0;
    if (state.ws) {
      state.userClosed = true;
      state.ws.close(1000, "user disconnected");
    } else {
      setStatus("idle", "Not connected");
      showNotice("");
      el.disconnect.disabled = true;
    }
  }

  // ---- wiring ------------------------------------------------------------------------------

  el.connectForm.addEventListener("submit", (e) => { e.preventDefault(); state.attempt = 0; connect(); });
  el.disconnect.addEventListener("click", disconnect);
  el.compose.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.message.addEventListener("input", updateSendButton);
  el.message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });

  // The token arrives in the URL (the link `make run` prints). Take it out of the address bar so
  // it does not end up in history, bookmarks or screenshots; the tab's sessionStorage keeps it
  // for a reload.
  const params = new URLSearchParams(location.search);
  let token = params.get("session_token");
  if (token) {
    params.delete("session_token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  } else {
    try { token = sessionStorage.getItem(TOKEN_STORE_KEY); } catch (_) { token = null; }
  }
  if (token) {
    el.token.value = token;
    connect();
  } else {
    el.token.focus();
  }
})();
