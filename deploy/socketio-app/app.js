"use strict";
// Sample socket.io app, unmodified for stickyd: it calls server.listen(port)
// like any app. Under `stickyd run -- node app.js` the edge is its cluster
// primary, so the listen is answered by the edge and connections arrive as
// handles over the IPC channel, each session always on the same worker.
const http = require("node:http");
const { Server } = require("socket.io");

const WORKER = process.env.STICKYD_WORKER_ID ?? "standalone";
const PORT = Number(process.env.PORT) || 3000;

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>stickyd socket.io sample</title>
<h1>stickyd socket.io sample</h1>
<p>transport: <b id="t">-</b>, served by worker <b id="w">-</b></p>
<ul id="log"></ul>
<script src="/socket.io/socket.io.js"></script>
<script>
  const socket = io();
  const log = (m) => { const li = document.createElement("li"); li.textContent = m; document.getElementById("log").prepend(li); };
  socket.on("connect", () => { document.getElementById("t").textContent = socket.io.engine.transport.name; });
  socket.io.engine.on("upgrade", (t) => { document.getElementById("t").textContent = t.name; });
  socket.on("hello", (m) => { document.getElementById("w").textContent = m.worker; log("hello from worker " + m.worker); });
  socket.on("tick", (m) => log("tick " + m.n + " from worker " + m.worker));
</script>
`;

const server = http.createServer((req, res) => {
  if (req.method === "GET" && (req.url === "/" || req.url === "/index.html")) {
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8", "Content-Length": Buffer.byteLength(PAGE) });
    res.end(PAGE);
    return;
  }
  if (req.method === "GET" && req.url === "/whoami") {
    const body = JSON.stringify({ worker: WORKER, pid: process.pid });
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
    res.end(body);
    return;
  }
  res.writeHead(404, { "Content-Type": "text/plain" });
  res.end("not found\n");
});

const io = new Server(server);
io.on("connection", (socket) => {
  socket.emit("hello", { worker: WORKER, id: socket.id });
  let n = 0;
  const timer = setInterval(() => socket.emit("tick", { n: ++n, worker: WORKER }), 5000);
  socket.on("disconnect", () => clearInterval(timer));
});

server.listen(PORT);

// Let stickyd drain: stop accepting, close sockets, then exit.
process.on("SIGTERM", () => {
  io.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 10000).unref();
});
