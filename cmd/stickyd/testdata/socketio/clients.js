"use strict";
// clients.js — socket.io-client load/correctness driver for stickyd's e2e tests.
//
//   node clients.js --url http://127.0.0.1:PORT [--clients 200] [--shared-agents K]
//       [--agent-max-sockets 1] [--transports polling,websocket|websocket|polling]
//       [--messages 3] [--binary-bytes N] [--timeout-ms 30000] [--expect-upgrade]
//       [--hold-ms N] [--reconnect [--until-reconnected K]]
//
// Prints ONE JSON line on stdout (see README.md for the fields) and exits 0 only
// if every client succeeded. Progress events go to stderr as JSON lines
// ({"event":"holding",...}, {"event":"connected",...}) so a test can act on them.

const http = require("http");
const https = require("https");
const crypto = require("crypto");
const { io } = require("socket.io-client");

// ---------- arguments ----------
function parseArgs(argv) {
  const o = {
    url: "",
    clients: 200,
    sharedAgents: 0,
    agentMaxSockets: 1,
    transports: ["polling", "websocket"],
    messages: 3,
    binaryBytes: 0,
    timeoutMs: 30000,
    expectUpgrade: false,
    holdMs: 0,
    reconnect: false,
    untilReconnected: 0,
  };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`missing value for ${a}`);
      return argv[++i];
    };
    const num = () => {
      const v = Number(next());
      if (!Number.isFinite(v) || v < 0) usage(`bad number for ${a}`);
      return v;
    };
    switch (a) {
      case "--url": o.url = next(); break;
      case "--clients": o.clients = num(); break;
      case "--shared-agents": o.sharedAgents = num(); break;
      case "--agent-max-sockets": o.agentMaxSockets = num(); break;
      case "--transports": o.transports = next().split(",").map((s) => s.trim()).filter(Boolean); break;
      case "--messages": o.messages = num(); break;
      case "--binary-bytes": o.binaryBytes = num(); break;
      case "--timeout-ms": o.timeoutMs = num(); break;
      case "--expect-upgrade": o.expectUpgrade = true; break;
      case "--hold-ms": o.holdMs = num(); break;
      case "--reconnect": o.reconnect = true; break;
      case "--until-reconnected": o.untilReconnected = num(); break;
      case "-h": case "--help": usage(""); break;
      default: usage(`unknown argument ${a}`);
    }
  }
  if (!o.url) usage("--url is required");
  if (o.clients < 1) usage("--clients must be >= 1");
  for (const t of o.transports) {
    if (t !== "polling" && t !== "websocket") usage(`unknown transport ${t}`);
  }
  if (o.expectUpgrade && !o.transports.includes("websocket")) usage("--expect-upgrade needs the websocket transport");
  return o;
}

function usage(msg) {
  if (msg) process.stderr.write(`clients.js: ${msg}\n`);
  process.stderr.write(
    "usage: node clients.js --url URL [--clients N] [--shared-agents K] [--agent-max-sockets M]\n" +
      "  [--transports polling,websocket|websocket|polling] [--messages N] [--binary-bytes N]\n" +
      "  [--timeout-ms N] [--expect-upgrade] [--hold-ms N] [--reconnect [--until-reconnected K]]\n"
  );
  process.exit(2);
}

const opt = parseArgs(process.argv);
const started = Date.now();
const deadline = started + opt.timeoutMs;

// ---------- result accounting ----------
const errors = {};
let sessionUnknown = 0;
function addError(msg) {
  errors[msg] = (errors[msg] || 0) + 1;
}
function event(obj) {
  process.stderr.write(JSON.stringify(obj) + "\n");
}

// describeErr turns socket.io-client / engine.io-client errors into a stable
// message (no sids, no ports) and tells whether it is a "Session ID unknown" /
// HTTP 400 failure.
function describeErr(kind, err) {
  let parts = [kind];
  let text = "";
  if (err && typeof err === "object") {
    if (err.message) parts.push(String(err.message));
    if (err.description !== undefined && err.description !== null) {
      const d = err.description;
      if (typeof d === "number" || typeof d === "string") parts.push(`(${d})`);
      else if (d && d.message) parts.push(`(${d.message})`);
      text += " " + (typeof d === "object" ? (d.message || "") + " " + (d.code || "") : String(d));
    }
    const ctx = err.context;
    if (ctx && typeof ctx === "object") {
      if (typeof ctx.responseText === "string") text += " " + ctx.responseText;
      if (ctx.status) text += " status " + ctx.status;
    }
    if (err.data && err.data.message) parts.push(String(err.data.message));
  } else if (err !== undefined) {
    parts.push(String(err));
  }
  const msg = parts.join(": ").replace(/[A-Za-z0-9_-]{20}/g, "<id>");
  const all = msg + " " + text;
  const unknown = /Session ID unknown/i.test(all) || /\(400\)/.test(msg) || /\bstatus 400\b/.test(text);
  return { msg, unknown };
}
function recordErr(client, kind, err) {
  const d = describeErr(kind, err);
  if (d.unknown) sessionUnknown++;
  client.errors.push(d.msg);
  addError(d.msg);
}

// ---------- TCP connection tracking for polling requests ----------
// Every polling transport gets an http.Agent subclass that records each TCP
// connection it creates (id, local port) and, per request, the engine.io sid
// carried by that request and the connection it went over.
const conns = []; // {id, agent, localPort, sids:Set}
// An https:// URL (TLS at the edge) gets the same tracking over https.Agent.
class TrackingAgent extends (/^https:/.test(opt.url) ? https.Agent : http.Agent) {
  constructor(index, options) {
    super(options);
    this.index = index;
    this.localPorts = new Set();
  }
  createConnection(options, cb) {
    const sock = super.createConnection(options, cb);
    const rec = { id: conns.length, agent: this.index, localPort: null, sids: new Set() };
    conns.push(rec);
    sock.__stickydConn = rec;
    sock.once("connect", () => {
      rec.localPort = sock.localPort;
      this.localPorts.add(sock.localPort);
    });
    return sock;
  }
  addRequest(req, options) {
    const m = /[?&]sid=([^&]+)/.exec(req.path || "");
    if (m) {
      req.once("socket", (sock) => {
        if (sock.__stickydConn) sock.__stickydConn.sids.add(decodeURIComponent(m[1]));
      });
    }
    return super.addRequest(req, options);
  }
}
const sharedAgents = [];
for (let i = 0; i < opt.sharedAgents; i++) {
  sharedAgents.push(new TrackingAgent(i, { keepAlive: true, maxSockets: opt.agentMaxSockets || 1 }));
}
if (opt.sharedAgents > 0 && !opt.transports.includes("websocket") && opt.agentMaxSockets <= 1) {
  process.stderr.write(
    "clients.js: warning: polling-only clients on shared agents with maxSockets 1 block each other " +
      "behind held long-poll GETs (until the 25 s ping); use --agent-max-sockets\n"
  );
}
let perClientAgentSeq = 1000000;
function agentFor(i) {
  if (sharedAgents.length > 0) return sharedAgents[i % sharedAgents.length];
  // Not shared: behaves like socket.io-client's default (agent:false => one
  // connection per request, closed after the response) but lets us count.
  return new TrackingAgent(perClientAgentSeq++, { keepAlive: false });
}

// ---------- helpers ----------
class StageError extends Error {}
function remaining() {
  return Math.max(1, deadline - Date.now());
}
function withDeadline(promise, stage) {
  let t;
  const to = new Promise((_, rej) => {
    t = setTimeout(() => rej(new StageError(`timeout waiting for ${stage}`)), remaining());
  });
  return Promise.race([promise, to]).finally(() => clearTimeout(t));
}
function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}
function sha256(x) {
  let b;
  if (Buffer.isBuffer(x)) b = x;
  else if (x instanceof ArrayBuffer) b = Buffer.from(x);
  else if (ArrayBuffer.isView(x)) b = Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  else return "not-binary:" + typeof x;
  return crypto.createHash("sha256").update(b).digest("hex");
}
function workerKey(id) {
  if (!id || typeof id !== "object") return "unknown";
  return id.worker !== null && id.worker !== undefined ? String(id.worker) : `pid-${id.pid}`;
}
function sameIdentity(a, b) {
  return a && b && a.pid === b.pid && String(a.worker) === String(b.worker);
}
function ack(socket, ev, ...args) {
  return socket.timeout(remaining()).emitWithAck(ev, ...args);
}

function makeSocket(i, client, reconnection) {
  const agent = agentFor(i);
  const socket = io(opt.url, {
    forceNew: true,
    transports: opt.transports,
    upgrade: opt.transports.includes("websocket"),
    reconnection,
    reconnectionDelay: 100,
    reconnectionDelayMax: 1000,
    randomizationFactor: 0.5,
    timeout: Math.min(20000, opt.timeoutMs),
    // The agent goes to the polling transport only: the WebSocket gets its own
    // connection (ws would otherwise queue its upgrade behind held long-polls).
    transportOptions: { polling: { agent } },
  });
  socket.on("connect_error", (err) => recordErr(client, "connect_error", err));
  socket.on("disconnect", (reason, details) => {
    client.disconnects++;
    if (reason === "transport error" || reason === "transport close" || reason === "ping timeout") {
      if (!client.closing) recordErr(client, `disconnect ${reason}`, details);
    }
  });
  return socket;
}

// ---------- normal (and hold) mode ----------
let holdBarrier = null;
let setupDone = 0;
function barrierArrive() {
  setupDone++;
  if (setupDone === opt.clients && holdBarrier) holdBarrier.open();
}
if (opt.holdMs > 0) {
  let open;
  const p = new Promise((r) => (open = r));
  holdBarrier = { p, open };
}

async function runClient(i) {
  const client = {
    i,
    connected: false,
    connectedOnce: false,
    upgraded: false,
    echoOK: false,
    binaryOK: false,
    workerChanged: false,
    hello: null,
    errors: [],
    disconnects: 0,
    closing: false,
    ok: false,
  };
  let arrived = false;
  const arrive = () => {
    if (!arrived && holdBarrier) {
      arrived = true;
      barrierArrive();
    }
  };
  const socket = makeSocket(i, client, false);
  const helloP = new Promise((r) => socket.once("hello", r));
  const connectP = new Promise((r) => socket.once("connect", r));
  try {
    await withDeadline(connectP, "connect");
    client.connected = client.connectedOnce = true;
    client.hello = await withDeadline(helloP, "hello");
    const first = await ack(socket, "whoami");
    if (!sameIdentity(first, client.hello)) client.workerChanged = true;

    const half = Math.ceil(opt.messages / 2);
    let echoOK = true;
    const echoRound = async (from, to) => {
      for (let m = from; m < to; m++) {
        const payload = `msg ${i}/${m} ${crypto.randomBytes(6).toString("hex")} ☃`;
        const got = await ack(socket, "echo", payload);
        if (got !== payload) {
          echoOK = false;
          client.errors.push("echo mismatch");
          addError("echo mismatch");
        }
      }
    };
    await echoRound(0, half);

    if (opt.binaryBytes > 0) {
      const buf = crypto.randomBytes(opt.binaryBytes);
      const got = await ack(socket, "echo", buf);
      if (sha256(got) === sha256(buf)) client.binaryOK = true;
      else {
        client.errors.push("binary mismatch");
        addError("binary mismatch");
      }
    }

    if (opt.expectUpgrade) {
      const eng = socket.io.engine;
      if (eng.transport.name !== "websocket") {
        await withDeadline(new Promise((r) => eng.once("upgrade", r)), "upgrade");
      }
    }
    client.upgraded = socket.io.engine.transport.name === "websocket";
    await echoRound(half, opt.messages);
    client.echoOK = echoOK;

    const second = await ack(socket, "whoami");
    if (!sameIdentity(second, client.hello)) client.workerChanged = true;

    if (holdBarrier) {
      arrive();
      await withDeadline(holdBarrier.p, "all clients to connect before the hold");
      await sleep(opt.holdMs);
      if (!socket.connected) throw new StageError("disconnected during hold");
      const third = await ack(socket, "whoami");
      if (!sameIdentity(third, client.hello)) client.workerChanged = true;
    }
    if (!socket.connected) throw new StageError("disconnected before the end");
  } catch (err) {
    const msg = err instanceof StageError ? err.message : `error: ${err && err.message ? err.message : err}`;
    client.errors.push(msg);
    addError(msg.replace(/[A-Za-z0-9_-]{20}/g, "<id>"));
  } finally {
    arrive();
    client.closing = true;
    socket.disconnect();
  }
  client.ok =
    client.connected &&
    client.hello !== null &&
    client.echoOK &&
    (!opt.expectUpgrade || client.upgraded) &&
    (opt.binaryBytes === 0 || client.binaryOK) &&
    !client.workerChanged &&
    client.errors.length === 0;
  return client;
}

// ---------- reconnect mode ----------
// Clients reconnect (new session) whenever they are disconnected, until
// --timeout-ms (or until --until-reconnected K clients reconnected and all are
// connected). Reports per client the worker before and after.
let allConnectedAnnounced = false;
let currentlyConnected = 0;
let reconnectedCount = 0;
let finishReconnect;
const reconnectDone = new Promise((r) => (finishReconnect = r));
function checkReconnectDone() {
  if (!allConnectedAnnounced && currentlyConnected === opt.clients) {
    allConnectedAnnounced = true;
    event({ event: "connected", connected: currentlyConnected, ms: Date.now() - started });
  }
  if (opt.untilReconnected > 0 && reconnectedCount >= opt.untilReconnected && currentlyConnected === opt.clients) {
    finishReconnect();
  }
}

async function runReconnectClient(i) {
  const client = {
    i,
    connected: false,
    connectedOnce: false,
    upgraded: false,
    echoOK: false,
    binaryOK: false,
    workerChanged: false,
    hello: null,
    errors: [],
    disconnects: 0,
    closing: false,
    ok: false,
    before: null,
    after: null,
    sessions: 0,
    reconnected: false,
  };
  const socket = makeSocket(i, client, true);
  socket.on("hello", (id) => {
    client.sessions++;
    if (client.before === null) client.before = id;
    else {
      client.after = id;
      if (!client.reconnected) {
        client.reconnected = true;
        reconnectedCount++;
      }
    }
    client.hello = id;
    checkReconnectDone();
  });
  socket.on("connect", () => {
    client.connected = client.connectedOnce = true;
    currentlyConnected++;
    checkReconnectDone();
  });
  socket.on("disconnect", (reason) => {
    if (client.connected) currentlyConnected--;
    client.connected = false;
    // A server-side disconnect ("io server disconnect") is not retried by
    // socket.io-client automatically: do it ourselves.
    if (reason === "io server disconnect" && !client.closing) socket.connect();
  });
  await Promise.race([reconnectDone, sleep(remaining())]);
  try {
    if (socket.connected) {
      const id = await socket.timeout(5000).emitWithAck("whoami");
      if (!sameIdentity(id, client.hello)) client.workerChanged = true;
      client.upgraded = socket.io.engine.transport.name === "websocket";
      client.echoOK = (await socket.timeout(5000).emitWithAck("echo", "ping")) === "ping";
    }
  } catch (err) {
    client.errors.push("final check: " + err.message);
    addError("final check: " + err.message);
  }
  client.closing = true;
  const stillConnected = socket.connected;
  socket.disconnect();
  client.connected = stillConnected;
  client.ok = stillConnected && client.echoOK && !client.workerChanged;
  return client;
}

// ---------- main ----------
async function main() {
  const runners = [];
  for (let i = 0; i < opt.clients; i++) {
    runners.push(opt.reconnect ? runReconnectClient(i) : runClient(i));
  }
  if (holdBarrier) {
    holdBarrier.p.then(() => event({ event: "holding", ms: Date.now() - started, holdMs: opt.holdMs }));
  }
  const results = await Promise.all(runners);

  const perWorker = {};
  let connected = 0, upgraded = 0, echoOK = 0, binaryOK = 0, workerChanged = 0, ok = 0;
  for (const c of results) {
    if (c.connected) connected++;
    if (c.upgraded) upgraded++;
    if (c.echoOK) echoOK++;
    if (c.binaryOK) binaryOK++;
    if (c.workerChanged) workerChanged++;
    if (c.ok) ok++;
    if (c.hello) {
      const k = workerKey(c.hello);
      perWorker[k] = (perWorker[k] || 0) + 1;
    }
  }
  let maxSessions = 0;
  for (const c of conns) maxSessions = Math.max(maxSessions, c.sids.size);
  const out = {
    clients: opt.clients,
    connected,
    upgraded,
    echoOK,
    binaryOK,
    workerChanged,
    errors,
    sessionUnknown,
    perWorker,
    maxSessionsPerTcpConnection: maxSessions,
    tcpConnections: conns.length,
    durationMs: Date.now() - started,
    ok,
    mode: opt.reconnect ? "reconnect" : opt.holdMs > 0 ? "hold" : "default",
    transports: opt.transports.join(","),
    sharedAgents: opt.sharedAgents,
  };
  if (opt.sharedAgents > 0) {
    out.agents = sharedAgents.map((a) => {
      const mine = conns.filter((c) => c.agent === a.index);
      const sids = new Set();
      for (const c of mine) for (const s of c.sids) sids.add(s);
      return {
        localPorts: Array.from(a.localPorts).sort((x, y) => x - y),
        tcpConnections: mine.length,
        sessions: sids.size,
        maxSessionsPerTcpConnection: mine.reduce((m, c) => Math.max(m, c.sids.size), 0),
      };
    });
    out.sharingVerified = maxSessions > 1;
  }
  if (opt.reconnect) {
    out.reconnected = reconnectedCount;
    out.perClient = results.map((c) => ({
      before: c.before ? workerKey(c.before) : null,
      after: c.after ? workerKey(c.after) : null,
      sessions: c.sessions,
      connected: c.connected,
    }));
  }
  let success = ok === opt.clients;
  if (opt.sharedAgents > 0 && opt.sharedAgents < opt.clients && maxSessions <= 1) {
    addError("shared agents: no TCP connection carried more than one session");
    success = false;
  }
  for (const a of sharedAgents) a.destroy();
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(success ? 0 : 1));
}

// Hard stop: never outlive the timeout by much, whatever hangs.
setTimeout(() => {
  addError("driver hard timeout");
  process.stdout.write(
    JSON.stringify({ clients: opt.clients, connected: 0, errors, sessionUnknown, durationMs: Date.now() - started, hardTimeout: true }) + "\n",
    () => process.exit(1)
  );
}, opt.timeoutMs + 15000).unref();

main().catch((err) => {
  process.stderr.write(`clients.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(3);
});
