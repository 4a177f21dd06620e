"use strict";
// clientaddr-clients.js — driver for clientaddr-app.js: what does the app see of clients that
// connect from several source addresses?
//
//   node clientaddr-clients.js --url http://127.0.0.1:PORT [--sources 127.0.0.2,127.0.0.3,127.0.0.4]
//       [--forge 6.6.6.6:1] [--http 3] [--timeout-ms 60000]
//
// From every source address, all at once, for every mode and forged in {no, yes} one
// socket.io session (forged: it sends its own X-Stickyd-Client-Addr: FORGE on every request):
//   polling-first         transports polling,websocket; the polling requests of the source's
//                         sessions share one keep-alive http.Agent (localAddress = source),
//                         the WebSocket binds localAddress; waits for the upgrade
//   polling-only          transports polling, on that shared agent
//   websocket-first       transports websocket, localAddress = source
//   websocket-after-http  a keep-alive agent with one socket: GET /addr, then the WebSocket
//                         over the same agent, so the upgrade travels on a connection that
//                         already carried a request
// Each session records the "addr" event (socket.handshake.address ...) and the "addr" ack after
// connecting (and after the upgrade). Plus --http GET /addr per source and forged value on one
// keep-alive agent per source, recording the client's own local port.
// Prints ONE JSON line {sessions:[...], http:[...], errors:[...]}; the Go test judges it.
// Exit 0 when every session connected and every request was answered.
const http = require("http");
const { io } = require("socket.io-client");

function parseArgs(argv) {
  const o = { url: "", sources: ["127.0.0.2", "127.0.0.3", "127.0.0.4"], forge: "6.6.6.6:1", http: 3, timeoutMs: 60000 };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`missing value for ${a}`);
      return argv[++i];
    };
    switch (a) {
      case "--url": o.url = next(); break;
      case "--sources": o.sources = next().split(",").map((s) => s.trim()).filter(Boolean); break;
      case "--forge": o.forge = next(); break;
      case "--http": o.http = Number(next()); break;
      case "--timeout-ms": o.timeoutMs = Number(next()); break;
      default: usage(`unknown argument ${a}`);
    }
  }
  if (!o.url || o.sources.length === 0) usage("--url and --sources are required");
  if (!(o.http >= 0 && o.http <= 100) || !(o.timeoutMs > 0)) usage("--http must be 0..100, --timeout-ms positive");
  return o;
}
function usage(msg) {
  process.stderr.write(`clientaddr-clients.js: ${msg}\n`);
  process.stderr.write("usage: node clientaddr-clients.js --url URL [--sources A,B] [--forge IP:PORT] [--http N] [--timeout-ms N]\n");
  process.exit(2);
}

const opt = parseArgs(process.argv);
const FIELD = "X-Stickyd-Client-Addr";
const deadline = Date.now() + opt.timeoutMs;
const remaining = () => Math.max(1, deadline - Date.now());
const errors = [];

function withDeadline(p, what) {
  let t;
  return Promise.race([
    p,
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timeout: ${what}`)), remaining());
    }),
  ]).finally(() => clearTimeout(t));
}

// getAddr: GET /addr on agent; resolves {status, body, localPort}.
function getAddr(agent, source, forged) {
  return withDeadline(
    new Promise((resolve, reject) => {
      const headers = forged ? { [FIELD]: opt.forge } : {};
      const req = http.get(opt.url + "/addr", { agent, localAddress: source, headers }, (res) => {
        const localPort = res.socket.localPort;
        let data = "";
        res.setEncoding("utf8");
        res.on("data", (d) => (data += d));
        res.on("end", () => {
          try {
            resolve({ status: res.statusCode, body: JSON.parse(data), localPort });
          } catch (err) {
            reject(new Error(`GET /addr: ${res.statusCode} ${data.slice(0, 200)}`));
          }
        });
      });
      req.on("error", reject);
    }),
    `GET /addr from ${source}`
  );
}

function ack(socket, what) {
  return withDeadline(new Promise((resolve) => socket.emit("addr", resolve)), what);
}

async function session(source, mode, forged, sharedAgent) {
  const rec = { source, mode, forged, address: null, conn: null, field: null, worker: null, ack: null, ackAfterUpgrade: null, upgraded: false, http: null, error: null };
  const extraHeaders = forged ? { [FIELD]: opt.forge } : {};
  const o = { forceNew: true, reconnection: false, timeout: remaining(), extraHeaders, transportOptions: {} };
  let own = null;
  switch (mode) {
    case "polling-first":
      o.transports = ["polling", "websocket"];
      o.transportOptions.polling = { agent: sharedAgent };
      o.transportOptions.websocket = { localAddress: source };
      break;
    case "polling-only":
      o.transports = ["polling"];
      o.transportOptions.polling = { agent: sharedAgent };
      break;
    case "websocket-first":
      o.transports = ["websocket"];
      o.transportOptions.websocket = { localAddress: source };
      break;
    case "websocket-after-http":
      own = new http.Agent({ keepAlive: true, maxSockets: 1, localAddress: source });
      o.transports = ["websocket"];
      o.transportOptions.websocket = { agent: own };
      break;
  }
  let socket;
  try {
    if (own) {
      const r = await getAddr(own, source, forged);
      rec.http = { status: r.status, remoteAddress: r.body.remoteAddress, remotePort: r.body.remotePort, localPort: r.localPort };
    }
    socket = io(opt.url, o);
    const upgraded =
      mode === "polling-first"
        ? new Promise((resolve) => socket.io.on("open", () => socket.io.engine.once("upgrade", resolve)))
        : null;
    const first = await withDeadline(
      new Promise((resolve, reject) => {
        socket.once("addr", resolve);
        socket.once("connect_error", (err) => reject(new Error(`connect_error: ${err && err.message}`)));
      }),
      `${mode} from ${source}: addr event`
    );
    rec.address = first.address;
    rec.conn = first.conn;
    rec.field = first.field;
    rec.worker = first.worker;
    rec.ack = (await ack(socket, "addr ack")).address;
    if (upgraded) {
      await withDeadline(upgraded, `${mode} from ${source}: upgrade`);
      rec.upgraded = true;
      rec.ackAfterUpgrade = (await ack(socket, "addr ack after upgrade")).address;
    }
  } catch (err) {
    rec.error = String(err && err.message ? err.message : err);
    errors.push(`${mode} from ${source} (forged ${forged}): ${rec.error}`);
  } finally {
    if (socket) socket.close();
    if (own) own.destroy();
  }
  return rec;
}

async function httpChecks(source) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1, localAddress: source });
  const out = [];
  try {
    for (let i = 0; i < opt.http; i++) {
      for (const forged of [false, true]) {
        try {
          const r = await getAddr(agent, source, forged);
          out.push(Object.assign({ source, forged, status: r.status, localPort: r.localPort }, r.body));
        } catch (err) {
          errors.push(`GET /addr from ${source} (forged ${forged}): ${err.message}`);
        }
      }
    }
  } finally {
    agent.destroy();
  }
  return out;
}

async function main() {
  const modes = ["polling-first", "polling-only", "websocket-first", "websocket-after-http"];
  const jobs = [];
  const agents = [];
  for (const source of opt.sources) {
    const shared = new http.Agent({ keepAlive: true, maxSockets: 4, localAddress: source });
    agents.push(shared);
    for (const mode of modes) for (const forged of [false, true]) jobs.push(session(source, mode, forged, shared));
  }
  const httpJobs = opt.sources.map(httpChecks);
  const sessions = await Promise.all(jobs);
  const httpResults = [].concat(...(await Promise.all(httpJobs)));
  for (const a of agents) a.destroy();
  const ok = errors.length === 0;
  process.stdout.write(JSON.stringify({ sessions, http: httpResults, errors }) + "\n", () => process.exit(ok ? 0 : 1));
}

setTimeout(() => {
  process.stdout.write(JSON.stringify({ sessions: [], http: [], errors: ["driver hard timeout"] }) + "\n", () => process.exit(1));
}, opt.timeoutMs + 10000).unref();

main().catch((err) => {
  process.stderr.write(`clientaddr-clients.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(3);
});
