"use strict";
// cluster-page-app.js — cluster-app.js (the socket.io cluster recipe with
// @socket.io/cluster-adapter, all its /cluster/ routes) plus a page for a real browser:
//   GET /cluster-page   HTML that loads /socket.io/socket.io.js (served by socket.io itself),
//                       connects (transports from ?transports=, default polling,websocket) and
//                       keeps what it saw in window.__cluster: {connected, worker, pid, transport,
//                       bcast: [ids of "bcast" events], room: [{id, room, from}], errors};
//                       window.__join(room) joins a room and resolves with the worker's identity;
//                       answers "ask" (io.timeout().emit acks) with its worker.
// cluster-app.js stays as it is: this file hands it an http.createServer whose handler serves
// the page first.
const http = require("http");

const PAGE = `<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>stickyd cluster page</title></head>
<body data-state="connecting">
<p id="worker">connecting</p>
<script src="/socket.io/socket.io.js"></script>
<script>
"use strict";
const st = (window.__cluster = { connected: false, worker: null, pid: null, transport: null, bcast: [], room: [], errors: [] });
const transports = (new URLSearchParams(location.search).get("transports") || "polling,websocket").split(",");
const socket = io({ transports });
socket.io.on("open", () => {
  const engine = socket.io.engine;
  st.transport = engine.transport.name;
  engine.on("upgrade", (t) => { st.transport = t.name; });
});
socket.on("connect", () => { st.connected = true; document.body.dataset.state = "connected"; });
socket.on("hello", (id) => {
  st.worker = id.worker;
  st.pid = id.pid;
  document.getElementById("worker").textContent = "worker " + id.worker + " (pid " + id.pid + ")";
});
socket.on("bcast", (m) => st.bcast.push(String(m && m.id)));
socket.on("room", (m) => st.room.push({ id: String(m.id), room: String(m.room), from: m.from ? m.from.worker : null }));
socket.on("ask", (ack) => { if (typeof ack === "function") ack({ worker: st.worker }); });
socket.on("connect_error", (e) => st.errors.push("connect_error: " + (e && e.message)));
socket.on("disconnect", (reason) => { st.connected = false; st.errors.push("disconnect: " + reason); });
window.__join = (room) => new Promise((resolve) => socket.emit("join", room, resolve));
</script>
</body>
</html>
`;

const createServer = http.createServer;
http.createServer = function (handler) {
  http.createServer = createServer; // only cluster-app.js's server
  return createServer.call(http, (req, res) => {
    if (req.method === "GET" && req.url.split("?")[0] === "/cluster-page") {
      res.writeHead(200, { "Content-Type": "text/html; charset=utf-8", "Content-Length": Buffer.byteLength(PAGE), "Cache-Control": "no-store" });
      res.end(PAGE);
      return;
    }
    handler(req, res);
  });
};
require("./cluster-app.js");
