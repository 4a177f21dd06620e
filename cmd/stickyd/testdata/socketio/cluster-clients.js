"use strict";
// cluster-clients.js — checks that @socket.io/cluster-adapter works across stickyd's Node
// workers (cluster-app.js). Prints ONE JSON line on stdout; exits 0 only if every check passed.
//
//   node cluster-clients.js --url http://127.0.0.1:PORT --workers 4 [--clients 200]
//       [--transports polling,websocket|websocket] [--route-header X-Route] [--timeout-ms 90000]
//
// The edge routes plain HTTP by its -key rules, so the driver reaches every worker by varying
// the --route-header value (run stickyd with -key sid,header:X-Route) until each of --workers
// distinct pids has answered /whoami. Then, with all clients connected:
//   emit        from every worker, io.emit reaches every client
//   fetch       from every worker, fetchSockets() counts every client
//   sse         from every worker, serverSideEmit with ack gets workers-1 answers, no error
//   emit-ack    from every worker, a broadcast with acks (io.timeout().emit) gets every
//               client's answer, no timeout
//   room        client 0 joins a room on its worker; a room broadcast from every other worker
//               reaches it, and nobody else (checked behind a full emit from the same worker)
//   socketsJoin from one worker, every socket of every worker joins a room; a room broadcast
//               from another worker reaches every client; fetchSockets of the room counts all
//   binary      io.emit with a Buffer from every worker: what the clients got (reported, the
//               test decides: JSON serialization turns a relayed Buffer into an object unless
//               something revives it)
const http = require("http");
const crypto = require("crypto");
const { io } = require("socket.io-client");

const opt = { url: "", clients: 200, workers: 0, transports: ["polling", "websocket"], routeHeader: "X-Route", timeoutMs: 90000 };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const v = process.argv[++i];
  switch (a) {
    case "--url": opt.url = v; break;
    case "--clients": opt.clients = Number(v); break;
    case "--workers": opt.workers = Number(v); break;
    case "--transports": opt.transports = v.split(","); break;
    case "--route-header": opt.routeHeader = v; break;
    case "--timeout-ms": opt.timeoutMs = Number(v); break;
    default:
      process.stderr.write(`cluster-clients.js: unknown argument ${a}\n`);
      process.exit(2);
  }
}
if (!opt.url || !(opt.workers >= 2) || !(opt.clients >= 1)) {
  process.stderr.write("usage: node cluster-clients.js --url URL --workers N [--clients N] [--transports ...] [--route-header H] [--timeout-ms N]\n");
  process.exit(2);
}
const started = Date.now();
const out = { clients: opt.clients, workers: [], errors: [] };
function fail(msg) {
  out.errors.push(msg);
}
function progress(obj) {
  process.stderr.write(JSON.stringify(Object.assign({ ms: Date.now() - started }, obj)) + "\n");
}

function get(path, route) {
  return new Promise((resolve, reject) => {
    const u = new URL(path, opt.url);
    const req = http.get(u, { agent: false, headers: { [opt.routeHeader]: String(route) } }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (body += c));
      res.on("end", () => {
        try {
          const j = JSON.parse(body);
          if (res.statusCode !== 200) reject(new Error(`${path}: ${res.statusCode} ${body}`));
          else resolve(j);
        } catch (e) {
          reject(new Error(`${path}: ${res.statusCode} ${body.slice(0, 200)}`));
        }
      });
    });
    req.setTimeout(15000, () => req.destroy(new Error(`${path}: timeout`)));
    req.on("error", reject);
  });
}

// waitFor resolves when cond() holds (checked on every event and every 50 ms) or after ms.
function waitFor(cond, ms) {
  return new Promise((resolve) => {
    const end = Date.now() + ms;
    const tick = () => {
      if (cond()) return resolve(true);
      if (Date.now() > end) return resolve(false);
      setTimeout(tick, 50);
    };
    tick();
  });
}

const clients = [];
function connectAll() {
  for (let i = 0; i < opt.clients; i++) {
    const c = { i, hello: null, bcast: new Set(), room: [], bin: new Map(), connected: false };
    c.socket = io(opt.url, { forceNew: true, transports: opt.transports, reconnection: false, timeout: 20000 });
    c.socket.on("hello", (id) => (c.hello = id));
    c.socket.on("connect", () => (c.connected = true));
    c.socket.on("disconnect", () => (c.connected = false));
    c.socket.on("connect_error", (e) => fail(`client ${i}: connect_error ${e.message}`));
    c.socket.on("bcast", (m) => c.bcast.add(m.id));
    c.socket.on("room", (m) => c.room.push(m.id));
    c.socket.on("bin", (m, buf) => c.bin.set(m.id, buf));
    c.socket.on("ask", (ack) => ack(i));
    clients.push(c);
  }
  return waitFor(() => clients.every((c) => c.connected && c.hello), 60000);
}
const count = (f) => clients.filter(f).length;

function isBytes0to255(b) {
  if (!(b instanceof ArrayBuffer) && !ArrayBuffer.isView(b)) return false;
  const u = Buffer.isBuffer(b) ? b : Buffer.from(b instanceof ArrayBuffer ? b : b.buffer);
  if (u.length !== 256) return false;
  for (let i = 0; i < 256; i++) if (u[i] !== i) return false;
  return true;
}

async function main() {
  // Find a route key for every worker.
  const routes = new Map(); // pid -> {route, worker}
  for (let k = 0; k < 400 && routes.size < opt.workers; k++) {
    const id = await get("/whoami", k);
    if (!routes.has(id.pid)) routes.set(id.pid, { route: k, worker: id.worker, pid: id.pid });
  }
  if (routes.size < opt.workers) {
    fail(`only ${routes.size} of ${opt.workers} workers answered /whoami`);
  }
  const workers = [...routes.values()].sort((a, b) => Number(a.worker) - Number(b.worker));
  progress({ event: "routes", workers });

  if (!(await connectAll())) {
    fail(`only ${count((c) => c.connected && c.hello)} of ${opt.clients} clients connected`);
  }
  out.connected = count((c) => c.connected);
  out.perWorker = {};
  for (const c of clients) if (c.hello) out.perWorker[c.hello.worker] = (out.perWorker[c.hello.worker] || 0) + 1;
  progress({ event: "connected", connected: out.connected, perWorker: out.perWorker });

  for (const w of workers) {
    const r = { worker: w.worker, pid: w.pid };
    out.workers.push(r);
    const wrong = (j) => j.pid !== w.pid && fail(`route ${w.route} answered by pid ${j.pid}, not ${w.pid}`);

    const id = "e-" + w.worker + "-" + crypto.randomBytes(4).toString("hex");
    wrong(await get("/cluster/emit?id=" + id, w.route));
    await waitFor(() => count((c) => c.bcast.has(id)) === opt.clients, 15000);
    r.emitReceived = count((c) => c.bcast.has(id));

    const f = await get("/cluster/fetch", w.route);
    wrong(f);
    r.fetchCount = f.count;

    const s = await get("/cluster/sse", w.route);
    wrong(s);
    r.sseResponses = s.responses.length;
    r.sseError = s.error;
    r.sseFrom = s.responses.map((x) => x && x.pid).sort();

    const ea = await get("/cluster/emit-ack", w.route);
    wrong(ea);
    r.ackCount = ea.count;
    r.ackError = ea.error;

    const bid = "b-" + w.worker + "-" + crypto.randomBytes(4).toString("hex");
    wrong(await get("/cluster/emit-binary?id=" + bid, w.route));
    await waitFor(() => count((c) => c.bin.has(bid)) === opt.clients, 15000);
    r.binaryReceived = count((c) => c.bin.has(bid));
    r.binaryIntact = count((c) => c.bin.has(bid) && isBytes0to255(c.bin.get(bid)));
    // Clients of the emitting worker get the Buffer locally; the others through the relay.
    r.binaryIntactRemote = count((c) => c.hello && c.hello.pid !== w.pid && c.bin.has(bid) && isBytes0to255(c.bin.get(bid)));
    r.remoteClients = count((c) => c.hello && c.hello.pid !== w.pid);
    progress({ event: "worker", result: r });
  }

  // A room joined on one worker, broadcast to from the others.
  const member = clients[0];
  const room = "room-" + crypto.randomBytes(4).toString("hex");
  await member.socket.timeout(10000).emitWithAck("join", room);
  out.room = { worker: member.hello.worker, from: [], leaked: 0 };
  for (const w of workers) {
    if (w.pid === member.hello.pid) continue;
    const id = "r-" + w.worker + "-" + crypto.randomBytes(4).toString("hex");
    await get(`/cluster/room-emit?room=${room}&id=${id}`, w.route);
    // Behind the room broadcast, a full emit from the same worker: once every client has it,
    // the room broadcast has arrived wherever it was going to.
    const marker = id + "-after";
    await get("/cluster/emit?id=" + marker, w.route);
    await waitFor(() => count((c) => c.bcast.has(marker)) === opt.clients, 15000);
    if (member.room.includes(id)) out.room.from.push(w.worker);
    out.room.leaked += count((c) => c !== member && c.room.includes(id));
  }
  const rc = await get(`/cluster/fetch?room=${room}`, workers[workers.length - 1].route);
  out.room.fetchCount = rc.count;

  // socketsJoin from one worker, then a room broadcast from another.
  const all = "all-" + crypto.randomBytes(4).toString("hex");
  await get(`/cluster/sockets-join?room=${all}`, workers[0].route);
  out.socketsJoin = { fetchCount: 0, fetchTries: 0 };
  // The join reaches the other workers asynchronously (as with any adapter): ask until every
  // socket is in the room, bounded.
  for (const end = Date.now() + 10000; Date.now() < end && out.socketsJoin.fetchCount !== opt.clients; ) {
    if (out.socketsJoin.fetchTries++ > 0) await new Promise((r) => setTimeout(r, 100));
    out.socketsJoin.fetchCount = (await get(`/cluster/fetch?room=${all}`, workers[1].route)).count;
  }
  const sid = "j-" + crypto.randomBytes(4).toString("hex");
  await get(`/cluster/room-emit?room=${all}&id=${sid}`, workers[1].route);
  await waitFor(() => count((c) => c.room.includes(sid)) === opt.clients, 15000);
  out.socketsJoin.received = count((c) => c.room.includes(sid));
}

setTimeout(() => {
  fail("driver hard timeout");
  finish(1);
}, opt.timeoutMs).unref();

function finish(code) {
  for (const c of clients) c.socket.disconnect();
  out.durationMs = Date.now() - started;
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(code));
}

main().then(
  () => finish(out.errors.length === 0 ? 0 : 1),
  (err) => {
    fail(`error: ${err && err.stack ? err.stack : err}`);
    finish(1);
  }
);
