"use strict";
// multihost-clients.js — the client side of the multi-host e2e (multihost_e2e_test.go), run
// inside the clients' network namespace. Connects two groups of socket.io-client sessions
// through the balancer in front of the hosts (no cookies: Node's client keeps none):
//
//   "plain"     --clients N: default transports (polling, then the WebSocket upgrade), one
//               connection per request as socket.io-client does by default;
//   "keepalive" --keepalive-clients M: polling only, all over --agents K shared keep-alive
//               http.Agents (--agent-max-sockets S each), so one TCP connection carries
//               requests of several sessions and the balancer must route each request.
//
// Every session checks that its "whoami" acks (--messages per session; each one a request
// of the session) come from the worker that said "hello". Then it reads commands on stdin,
// one per line, and answers each with one JSON line on stdout:
//
//   status                        {connected, perHost, perWorker, errors, mismatches, ...}
//   emit URL ID                   GET URL/mh/emit?id=ID, then waits until every connected
//                                 session got that broadcast: {id, from, received, missing}
//   peercheck URL N               N keepalive sessions each POST a pong ("3") naming their sid
//                                 through another balancer URL: {ok, failed, answers}
//   get URL                       {status, body} of a GET (a host's /metrics, from this namespace)
//   mark                          remembers every session's host and clears the counters
//   reconnected HOST TIMEOUT_MS   waits until every session marked on HOST is connected to
//                                 another host: {moved, stillDown, disconnectsElsewhere, ...}
//   quit                          closes everything and exits
const http = require("http");
const readline = require("readline");
const { io } = require("socket.io-client");

function parseArgs(argv) {
  const o = { url: "", clients: 300, keepaliveClients: 300, agents: 6, agentMaxSockets: 64, messages: 3, timeoutMs: 120000 };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => argv[++i];
    switch (a) {
      case "--url": o.url = next(); break;
      case "--clients": o.clients = Number(next()); break;
      case "--keepalive-clients": o.keepaliveClients = Number(next()); break;
      case "--agents": o.agents = Number(next()); break;
      case "--agent-max-sockets": o.agentMaxSockets = Number(next()); break;
      case "--messages": o.messages = Number(next()); break;
      case "--timeout-ms": o.timeoutMs = Number(next()); break;
      default:
        process.stderr.write(`multihost-clients.js: unknown argument ${a}\n`);
        process.exit(2);
    }
  }
  if (!o.url) {
    process.stderr.write("multihost-clients.js: --url is required\n");
    process.exit(2);
  }
  return o;
}
const opt = parseArgs(process.argv);

// Records which sessions each keep-alive TCP connection carried.
const conns = [];
class TrackingAgent extends http.Agent {
  createConnection(options, cb) {
    const sock = super.createConnection(options, cb);
    const rec = { sids: new Set() };
    conns.push(rec);
    sock.__conn = rec;
    return sock;
  }
  addRequest(req, options) {
    const m = /[?&]sid=([^&]+)/.exec(req.path || "");
    if (m) req.once("socket", (sock) => sock.__conn && sock.__conn.sids.add(m[1]));
    return super.addRequest(req, options);
  }
}
const agents = [];
for (let i = 0; i < opt.agents; i++) agents.push(new TrackingAgent({ keepAlive: true, maxSockets: opt.agentMaxSockets }));

const clients = [];
const errors = {};
function recordErr(c, what) {
  const k = `${c.group}: ${what}`;
  errors[k] = (errors[k] || 0) + 1;
}
const key = (id) => (id ? `${id.host}/${id.worker}/${id.pid}` : "none");

function makeClient(i, group) {
  const c = { i, group, hello: null, connected: false, disconnects: 0, reconnects: 0, hosts: [], bcast: new Set(), mismatches: 0 };
  const keepalive = group === "keepalive";
  c.socket = io(opt.url, {
    forceNew: true,
    transports: keepalive ? ["polling"] : ["polling", "websocket"],
    reconnectionDelay: 200,
    reconnectionDelayMax: 2000,
    timeout: 20000,
    transportOptions: keepalive ? { polling: { agent: agents[i % agents.length] } } : {},
  });
  c.socket.on("hello", (id) => {
    if (c.hello) c.reconnects++;
    c.hello = id;
    c.hosts.push(id.host);
    c.connected = true;
  });
  c.socket.on("bcast", (m) => c.bcast.add(m.id));
  c.socket.on("disconnect", (reason) => {
    c.connected = false;
    c.disconnects++;
    c.lastReason = reason;
  });
  c.socket.on("connect_error", (err) => recordErr(c, `connect_error ${err.message}`));
  return c;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(cond, ms) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) return false;
    await sleep(50);
  }
  return true;
}

async function checkWhoami(c) {
  for (let k = 0; k < opt.messages; k++) {
    try {
      const id = await c.socket.timeout(20000).emitWithAck("whoami");
      if (key(id) !== key(c.hello)) c.mismatches++;
    } catch (err) {
      recordErr(c, `whoami ${err.message}`);
    }
  }
}

function status() {
  const perHost = {};
  const perWorker = {};
  let connected = 0;
  let disconnects = 0;
  let mismatches = 0;
  for (const c of clients) {
    if (c.connected) {
      connected++;
      perHost[c.hello.host] = (perHost[c.hello.host] || 0) + 1;
      perWorker[key(c.hello)] = (perWorker[key(c.hello)] || 0) + 1;
    }
    disconnects += c.disconnects;
    mismatches += c.mismatches;
  }
  let maxSessionsPerConn = 0;
  for (const r of conns) maxSessionsPerConn = Math.max(maxSessionsPerConn, r.sids.size);
  const upgraded = clients.filter((c) => c.connected && c.socket.io.engine && c.socket.io.engine.transport.name === "websocket").length;
  return {
    clients: clients.length, connected, upgraded, disconnects, mismatches, perHost, perWorker, errors,
    keepaliveConnections: conns.length, maxSessionsPerConnection: maxSessionsPerConn,
  };
}

function get(url) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false, timeout: 10000 }, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", reject);
  });
}

function postPong(base, sid) {
  return new Promise((resolve, reject) => {
    const req = http.request(`${base}/socket.io/?EIO=4&transport=polling&sid=${encodeURIComponent(sid)}`,
      { method: "POST", agent: false, timeout: 10000, headers: { "Content-Type": "text/plain;charset=UTF-8", "Content-Length": 1 } },
      (res) => {
        let body = "";
        res.on("data", (d) => (body += d));
        res.on("end", () => resolve({ status: res.statusCode, body }));
      });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", reject);
    req.end("3");
  });
}

let marked = null;
const commands = {
  async status() {
    return status();
  },
  async emit(url, id) {
    const r = await get(`${url}/mh/emit?id=${encodeURIComponent(id)}`);
    const from = JSON.parse(r.body);
    const live = clients.filter((c) => c.connected);
    await until(() => live.every((c) => c.bcast.has(id)), 30000);
    const received = live.filter((c) => c.bcast.has(id)).length;
    return { id, from, live: live.length, received, missing: live.length - received };
  },
  async peercheck(url, n) {
    const ks = clients.filter((c) => c.group === "keepalive" && c.connected).slice(0, Number(n));
    const answers = {};
    let ok = 0;
    for (const c of ks) {
      try {
        const r = await postPong(url, c.socket.io.engine.id);
        const k = `${r.status} ${r.body}`;
        answers[k] = (answers[k] || 0) + 1;
        if (r.status === 200 && r.body === "ok") ok++;
      } catch (err) {
        answers[err.message] = (answers[err.message] || 0) + 1;
      }
    }
    return { checked: ks.length, ok, failed: ks.length - ok, answers };
  },
  async get(url) {
    return get(url);
  },
  async mark() {
    marked = new Map();
    for (const c of clients) {
      marked.set(c, c.hello && c.hello.host);
      c.disconnects = 0;
      c.reconnects = 0;
    }
    for (const k of Object.keys(errors)) delete errors[k];
    return { marked: marked.size };
  },
  async reconnected(host, ms) {
    const victims = clients.filter((c) => marked.get(c) === host);
    const others = clients.filter((c) => marked.get(c) !== host);
    await until(() => victims.every((c) => c.connected && c.hello.host !== host), Number(ms));
    const moved = victims.filter((c) => c.connected && c.hello.host !== host);
    const movedTo = {};
    for (const c of moved) movedTo[c.hello.host] = (movedTo[c.hello.host] || 0) + 1;
    // Every moved session answers from its new host and worker, on request after request.
    await Promise.all(moved.map(checkWhoami));
    const touched = others.filter((c) => c.disconnects > 0 || c.reconnects > 0);
    return {
      victims: victims.length, moved: moved.length, movedTo, stillDown: victims.length - moved.length,
      others: others.length, othersDisconnected: touched.length,
      othersReasons: touched.slice(0, 5).map((c) => c.lastReason), status: status(),
    };
  },
  async quit() {
    for (const c of clients) c.socket.close();
    for (const a of agents) a.destroy();
    setTimeout(() => process.exit(0), 100);
    return { bye: true };
  },
};

async function main() {
  const started = Date.now();
  // Sessions open in small waves: a burst of 600 handshakes would measure the 2-core
  // machine, not the routing.
  const total = opt.clients + opt.keepaliveClients;
  for (let i = 0; i < total; i++) {
    clients.push(makeClient(i, i < opt.clients ? "plain" : "keepalive"));
    if (i % 25 === 24) await sleep(50);
  }
  const all = await until(() => clients.every((c) => c.connected), opt.timeoutMs);
  await Promise.all(clients.map(checkWhoami));
  const s = status();
  s.event = "connected";
  s.allConnected = all;
  s.durationMs = Date.now() - started;
  process.stdout.write(JSON.stringify(s) + "\n");

  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const [cmd, ...args] = line.trim().split(/\s+/);
    const f = commands[cmd];
    let out;
    try {
      out = f ? await f(...args) : { error: `unknown command ${cmd}` };
    } catch (err) {
      out = { error: String(err.message || err) };
    }
    out.event = cmd;
    process.stdout.write(JSON.stringify(out) + "\n");
  }
  process.exit(0);
}
main();
