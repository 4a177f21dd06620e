"use strict";
// clientaddr-app.js — a socket.io app that shows what it sees of its clients' addresses, for
// stickyd's client-address e2e test. listen(), or @socket.io/sticky's setupWorker(io) with
// STYLE=sticky.
//
//   socket.io: on connection emits "addr" {address: socket.handshake.address, conn:
//     socket.conn.remoteAddress, field: whether X-Stickyd-Client-Addr is among the handshake's
//     headers, worker, pid}; the "addr" event acks the same, read again at that moment.
//   GET /addr: {remoteAddress, remotePort, remoteFamily, connection: req.connection.remoteAddress,
//     field, worker, pid} of that request.
// Everything else is app-common.js.
const http = require("http");
const { Server } = require("socket.io");
const { handler, identity } = require("./app-common");

const FIELD = "x-stickyd-client-addr";
const orNull = (v) => (v === undefined ? null : v);

function httpHandler(req, res) {
  if (req.method === "GET" && req.url.split("?")[0] === "/addr") {
    const s = req.socket;
    const body = JSON.stringify(
      Object.assign(
        {
          remoteAddress: orNull(s.remoteAddress),
          remotePort: orNull(s.remotePort),
          remoteFamily: orNull(s.remoteFamily),
          connection: orNull(req.connection.remoteAddress),
          field: FIELD in req.headers || req.rawHeaders.some((h) => h.toLowerCase() === FIELD),
        },
        identity()
      )
    );
    // Answer a turn later, as an app that awaits something does.
    setImmediate(() => {
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
      res.end(body);
    });
    return;
  }
  handler(req, res);
}

function seen(socket) {
  return Object.assign(
    {
      address: orNull(socket.handshake.address),
      conn: orNull(socket.conn.remoteAddress),
      field: FIELD in socket.handshake.headers,
    },
    identity()
  );
}

const httpServer = http.createServer(httpHandler);
const io = new Server(httpServer);
io.on("connection", (socket) => {
  socket.emit("addr", seen(socket));
  socket.on("addr", (ack) => {
    if (typeof ack === "function") ack(seen(socket));
  });
});

if (process.env.STYLE === "sticky") {
  require("@socket.io/sticky").setupWorker(io);
  process.stderr.write(`clientaddr-app: sticky worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid}\n`);
} else {
  httpServer.listen(process.env.PORT || 3000, () => {
    process.stderr.write(`clientaddr-app: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} listening\n`);
  });
}
