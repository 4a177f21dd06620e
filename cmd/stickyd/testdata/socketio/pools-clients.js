"use strict";
// pools-clients.js — socket.io clients that echo in phases, driven over stdin, for the
// worker-pools test and `stickybench pools` (issue 15).
//
//   node pools-clients.js --url http://127.0.0.1:PORT [--clients 100] [--interval-ms 100]
//       [--echo-timeout-ms 10000] [--connect-timeout-ms 60000]
//
// At start every client connects (polling, then the WebSocket upgrade; no automatic
// reconnection, so a lost session stays lost and is counted), and ONE JSON line is printed:
//   {"event":"connected", clients, connected, upgraded, perWorker {id: n}, errors {msg: n}, ms}
// Then one command per stdin line, one JSON line on stdout for each:
//   start NAME  every client echoes in a loop: one echo in flight, then --interval-ms of
//               pause (the first pause is random, so clients do not echo in lock step)
//               → {"event":"started", phase}
//   stop        ends the loop, waits for the echoes in flight
//               → {"event":"phase", phase, echoes, failed, p50, p99, max (ms), disconnects, errors,
//                  windows: [{s, echoes, p50, p99}]} — windows: the echoes sent in second s of the phase
//   check       whoami on every client: still connected, same worker and pid as its hello
//               → {"event":"check", clients, connected, workerChanged, disconnects, perWorker, pids, errors}
//   quit        (or end of stdin) disconnects everyone and exits 0.
// Anything unknown → {"event":"error","error":…}.

const crypto = require("crypto");
const readline = require("readline");
const { io } = require("socket.io-client");

function parseArgs(argv) {
  const o = { url: "", clients: 100, intervalMs: 100, echoTimeoutMs: 10000, connectTimeoutMs: 60000 };
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
      case "--interval-ms": o.intervalMs = num(); break;
      case "--echo-timeout-ms": o.echoTimeoutMs = num(); break;
      case "--connect-timeout-ms": o.connectTimeoutMs = num(); break;
      default: usage(`unknown argument ${a}`);
    }
  }
  if (!o.url) usage("--url is required");
  if (o.clients < 1 || o.clients > 10000) usage("--clients: 1..10000");
  return o;
}

function usage(msg) {
  process.stderr.write(`pools-clients.js: ${msg}\n`);
  process.stderr.write(
    "usage: node pools-clients.js --url URL [--clients N] [--interval-ms N] [--echo-timeout-ms N] [--connect-timeout-ms N]\n"
  );
  process.exit(2);
}

const opt = parseArgs(process.argv);
const started = Date.now();

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}
function count(map, key) {
  map[key] = (map[key] || 0) + 1;
}
function clean(msg) {
  return String(msg).replace(/[A-Za-z0-9_-]{20}/g, "<id>");
}
function workerKey(id) {
  if (!id || typeof id !== "object") return "unknown";
  return id.worker !== null && id.worker !== undefined ? String(id.worker) : `pid-${id.pid}`;
}
function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// Disconnects and errors since start; a phase reports the ones during it.
let disconnects = 0;
const allErrors = {};
const clients = [];

function connectClient(i) {
  const c = { i, socket: null, hello: null, upgraded: false, closing: false };
  const socket = io(opt.url, {
    forceNew: true,
    reconnection: false,
    timeout: opt.connectTimeoutMs,
  });
  c.socket = socket;
  socket.on("disconnect", (reason) => {
    if (!c.closing) {
      disconnects++;
      count(allErrors, `disconnect: ${reason}`);
    }
  });
  const hello = new Promise((r) => socket.once("hello", r));
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      count(allErrors, "connect: timeout");
      resolve(c);
    }, opt.connectTimeoutMs);
    socket.once("connect_error", (err) => {
      clearTimeout(t);
      count(allErrors, clean(`connect_error: ${err && err.message}`));
      resolve(c);
    });
    socket.once("connect", async () => {
      c.hello = await hello;
      const eng = socket.io.engine;
      if (eng.transport.name !== "websocket") {
        await new Promise((r) => {
          eng.once("upgrade", r);
          eng.once("close", r);
        });
      }
      c.upgraded = eng.transport.name === "websocket";
      clearTimeout(t);
      resolve(c);
    });
  });
}

// ---------- phases ----------
let phase = null; // {name, running, rtts[], failed, errors{}, disconnectsAtStart, loops[]}

async function echoLoop(c, ph) {
  await sleep(Math.random() * opt.intervalMs);
  let m = 0;
  while (ph.running) {
    if (!c.socket.connected) {
      ph.failed++;
      count(ph.errors, "echo: not connected");
      return;
    }
    const payload = `pools ${c.i}/${m++} ${crypto.randomBytes(4).toString("hex")}`;
    const t0 = process.hrtime.bigint();
    try {
      const got = await c.socket.timeout(opt.echoTimeoutMs).emitWithAck("echo", payload);
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      if (got !== payload) {
        ph.failed++;
        count(ph.errors, "echo: mismatch");
      } else {
        ph.rtts.push(ms);
        const sec = Math.floor(Number(t0 - ph.hr0) / 1e9);
        (ph.perSecond[sec] = ph.perSecond[sec] || []).push(ms);
      }
    } catch (err) {
      ph.failed++;
      count(ph.errors, clean(`echo: ${err && err.message}`));
    }
    if (ph.running) await sleep(opt.intervalMs);
  }
}

function quantile(sorted, q) {
  if (sorted.length === 0) return 0;
  const k = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return Math.round(sorted[k] * 100) / 100;
}

async function command(line) {
  const [cmd, arg] = line.trim().split(/\s+/, 2);
  switch (cmd) {
    case "start": {
      if (phase) return out({ event: "error", error: `phase ${phase.name} is running: stop it first` });
      phase = { name: arg || "?", running: true, rtts: [], failed: 0, errors: {}, disconnectsAtStart: disconnects, t0: Date.now(), hr0: process.hrtime.bigint(), perSecond: [] };
      phase.loops = clients.filter((c) => c.hello).map((c) => echoLoop(c, phase));
      return out({ event: "started", phase: phase.name });
    }
    case "stop": {
      if (!phase) return out({ event: "error", error: "no phase is running" });
      const ph = phase;
      ph.running = false;
      await Promise.all(ph.loops);
      phase = null;
      const s = ph.rtts.slice().sort((a, b) => a - b);
      return out({
        event: "phase",
        phase: ph.name,
        ms: Date.now() - ph.t0,
        echoes: s.length,
        failed: ph.failed,
        p50: quantile(s, 0.5),
        p99: quantile(s, 0.99),
        max: quantile(s, 1),
        disconnects: disconnects - ph.disconnectsAtStart,
        errors: ph.errors,
        windows: Array.from(ph.perSecond, (w, sec) => {
          const ws = (w || []).sort((a, b) => a - b);
          return { s: sec, echoes: ws.length, p50: quantile(ws, 0.5), p99: quantile(ws, 0.99) };
        }),
      });
    }
    case "check": {
      const errors = {};
      const perWorker = {};
      const pids = new Set();
      let connected = 0;
      let workerChanged = 0;
      await Promise.all(
        clients.map(async (c) => {
          if (!c.hello || !c.socket.connected) return;
          try {
            const id = await c.socket.timeout(opt.echoTimeoutMs).emitWithAck("whoami");
            connected++;
            count(perWorker, workerKey(id));
            pids.add(id.pid);
            if (id.pid !== c.hello.pid || String(id.worker) !== String(c.hello.worker)) workerChanged++;
          } catch (err) {
            count(errors, clean(`whoami: ${err && err.message}`));
          }
        })
      );
      return out({
        event: "check",
        clients: opt.clients,
        connected,
        workerChanged,
        disconnects,
        perWorker,
        pids: Array.from(pids).sort((a, b) => a - b),
        errors: Object.assign({}, allErrors, errors),
      });
    }
    case "quit":
      return quit();
    default:
      return out({ event: "error", error: `unknown command ${JSON.stringify(line.trim())}: start NAME, stop, check, quit` });
  }
}

let quitting = false;
function quit() {
  if (quitting) return;
  quitting = true;
  for (const c of clients) {
    c.closing = true;
    c.socket.disconnect();
  }
  process.stdout.write("", () => process.exit(0));
}

async function main() {
  const all = await Promise.all(Array.from({ length: opt.clients }, (_, i) => connectClient(i)));
  clients.push(...all);
  const perWorker = {};
  let connected = 0;
  let upgraded = 0;
  for (const c of clients) {
    if (c.hello && c.socket.connected) {
      connected++;
      count(perWorker, workerKey(c.hello));
    }
    if (c.upgraded) upgraded++;
  }
  out({ event: "connected", clients: opt.clients, connected, upgraded, perWorker, errors: allErrors, ms: Date.now() - started });
  // Commands run one after another, in the order they arrive.
  let chain = Promise.resolve();
  const rl = readline.createInterface({ input: process.stdin });
  rl.on("line", (line) => {
    if (line.trim() === "") return;
    chain = chain.then(() => command(line)).catch((err) => out({ event: "error", error: String(err && err.stack) }));
  });
  rl.on("close", () => chain.then(quit));
}

main().catch((err) => {
  process.stderr.write(`pools-clients.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(3);
});
