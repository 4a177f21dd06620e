"use strict";
// multihost-app.js — the socket.io app of the multi-host e2e (multihost_e2e_test.go): one of
// the Node workers of one stickyd host. Broadcasts cross workers and hosts through Redis
// (@socket.io/redis-adapter), as in the Kubernetes recipe (deploy/multihost/k8s.yaml).
//
// Environment: REDIS_URL (redis://host:port), HOST_ID (the host's -node-id),
// STICKYD_WORKER_ID (set by stickyd), PING_INTERVAL_MS / PING_TIMEOUT_MS (engine.io).
//
//   GET /                      a page that connects with the polling transport only and puts
//                              the serving {host, worker, pid} in document.title as JSON
//   GET /mh/whoami             {host, worker, pid}
//   GET /mh/emit?id=ID         io.emit("bcast", {id, from}) — every client on every host
//   socket "hello" on connect  {host, worker, pid}; "whoami" (ack) the same
//
// Logs "multihost-app: connection_error ..." on stderr for every request engine.io refused
// (a request of a session this worker does not hold arrives here: a misroute).
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const me = { host: process.env.HOST_ID || null, worker: process.env.STICKYD_WORKER_ID || null, pid: process.pid };

const page = `<!doctype html><meta charset="utf-8"><title>connecting</title>
<script src="/socket.io/socket.io.js"></script>
<script>
const socket = io({ transports: ["polling"], reconnection: false });
socket.on("hello", (id) => { document.title = JSON.stringify(id); });
socket.on("connect_error", (err) => { document.title = "error: " + err.message; });
</script>`;

function json(res, code, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(code, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}

let io;
const httpServer = http.createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  switch (url.pathname) {
    case "/":
      res.writeHead(200, { "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store" });
      return res.end(page);
    case "/mh/whoami":
      return json(res, 200, me);
    case "/mh/emit":
      io.emit("bcast", { id: url.searchParams.get("id") || "", from: me });
      return json(res, 200, me);
  }
  json(res, 404, { error: "no such route" });
});

io = new Server(httpServer, {
  pingInterval: Number(process.env.PING_INTERVAL_MS) || 25000,
  pingTimeout: Number(process.env.PING_TIMEOUT_MS) || 20000,
});
io.engine.on("connection_error", (err) => {
  const q = (err.req && err.req.url) || "";
  process.stderr.write(`multihost-app: connection_error host=${me.host} worker=${me.worker} code=${err.code} message=${JSON.stringify(err.message)} url=${JSON.stringify(q)}\n`);
});
io.on("connection", (socket) => {
  socket.emit("hello", me);
  socket.on("whoami", (ack) => {
    if (typeof ack === "function") ack(me);
  });
});

async function main() {
  const pub = createClient({ url: process.env.REDIS_URL || "redis://127.0.0.1:6379" });
  const sub = pub.duplicate();
  for (const c of [pub, sub]) c.on("error", (err) => process.stderr.write(`multihost-app: redis: ${err.message}\n`));
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
  // Listen only once the adapter is up: stickyd counts the worker ready when it listens.
  httpServer.listen(process.env.PORT || 3000, () => {
    process.stderr.write(`multihost-app: host=${me.host} worker=${me.worker} pid=${me.pid} listening\n`);
  });
}

main().catch((err) => {
  process.stderr.write(`multihost-app: ${err.stack || err}\n`);
  process.exit(1);
});
