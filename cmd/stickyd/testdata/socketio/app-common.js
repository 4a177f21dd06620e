"use strict";
// Shared by server-listen.js and server-sticky.js: the plain HTTP routes and the
// socket.io event handlers of the e2e fixture app. Logs nothing per request.

const WORKER = process.env.STICKYD_WORKER_ID;

function identity() {
  return { worker: WORKER === undefined ? null : WORKER, pid: process.pid };
}

// handler serves the non-socket.io routes (socket.io intercepts /socket.io/ first).
function handler(req, res) {
  const url = new URL(req.url, "http://localhost");
  if (req.method === "GET" && url.pathname === "/whoami") {
    const body = JSON.stringify(identity());
    res.writeHead(200, {
      "Content-Type": "application/json",
      "Content-Length": Buffer.byteLength(body),
    });
    res.end(body);
    return;
  }
  if (req.method === "POST" && url.pathname === "/echo-body") {
    // Stream the body straight back (chunked), so 10 MiB never sits in memory.
    const headers = { "X-Worker": String(WORKER), "X-Pid": String(process.pid) };
    if (req.headers["content-type"]) headers["Content-Type"] = req.headers["content-type"];
    res.writeHead(200, headers);
    req.pipe(res);
    req.on("error", () => res.destroy());
    return;
  }
  if (req.method === "GET" && url.pathname === "/slow") {
    const ms = Math.max(0, Math.min(Number(url.searchParams.get("ms")) || 0, 600000));
    const timer = setTimeout(() => {
      const body = JSON.stringify(Object.assign({ slept: ms }, identity()));
      res.writeHead(200, {
        "Content-Type": "application/json",
        "Content-Length": Buffer.byteLength(body),
      });
      res.end(body);
    }, ms);
    res.on("close", () => clearTimeout(timer));
    return;
  }
  res.writeHead(404, { "Content-Type": "text/plain" });
  res.end("not found\n");
}

// onConnection wires the socket.io events used by clients.js.
function onConnection(socket) {
  socket.emit("hello", identity());
  // Binary-safe: socket.io carries Buffers as attachments, so an acked Buffer
  // comes back as a Buffer.
  socket.on("echo", (payload, ack) => {
    if (typeof ack === "function") ack(payload);
  });
  socket.on("whoami", (ack) => {
    if (typeof ack === "function") ack(identity());
  });
}

module.exports = { handler, onConnection, identity };
