"use strict";
// Baseline without stickyd: Node's own cluster with @socket.io/sticky's primary
// (least-connection), forking WORKERS (default 4) copies of server-sticky.js.
// Usage: PORT=3000 [WORKERS=4] [LB=least-connection] node sticky-primary.js
// Prints one line "sticky-primary: listening on PORT" on stdout when ready.
const cluster = require("cluster");
const http = require("http");
const path = require("path");
const { setupMaster } = require("@socket.io/sticky");

const workers = Number(process.env.WORKERS || 4);
const httpServer = http.createServer();
setupMaster(httpServer, {
  loadBalancingMethod: process.env.LB || "least-connection",
});

cluster.setupPrimary({
  exec: path.join(__dirname, "server-sticky.js"),
  serialization: "advanced", // @socket.io/sticky sends the first chunk as a Buffer
  silent: false,
});

let online = 0;
let listening = false;
function maybeReady() {
  if (listening && online === workers) {
    process.stdout.write(`sticky-primary: listening on ${httpServer.address().port}\n`);
  }
}
for (let i = 0; i < workers; i++) {
  const w = cluster.fork({ STICKYD_WORKER_ID: String(i) });
  w.once("online", () => {
    online++;
    maybeReady();
  });
}
cluster.on("exit", (worker, code, signal) => {
  process.stderr.write(`sticky-primary: worker pid ${worker.process.pid} exited (${signal || code})\n`);
});
httpServer.listen(Number(process.env.PORT || 3000), "127.0.0.1", () => {
  listening = true;
  maybeReady();
});

function shutdown() {
  for (const id in cluster.workers) cluster.workers[id].process.kill("SIGTERM");
  process.exit(0);
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
