"use strict";
// The socket.io cluster recipe: every worker uses @socket.io/cluster-adapter, whose messages
// go to the cluster primary (stickyd) over process.send and are relayed to the other workers.
// STYLE=sticky: @socket.io/sticky's setupWorker(io) instead of listen().
//
// Besides app-common.js's routes and events, HTTP routes that act across the cluster
// (answered as JSON with the answering worker's identity; the edge decides which worker):
//   GET /cluster/emit?id=ID                io.emit("bcast", {id, from})
//   GET /cluster/emit-binary?id=ID         io.emit("bin", {id, from}, Buffer [0..255])
//   GET /cluster/room-emit?room=R&id=ID    io.to(R).emit("room", {id, room, from})
//   GET /cluster/sockets-join?room=R       io.socketsJoin(R) (every socket of every worker)
//   GET /cluster/fetch[?room=R]            {count} of io[.in(R)].fetchSockets()
//   GET /cluster/sse                       io.serverSideEmit("who", ack) (adapter timeout 5 s): {responses, error}
//   GET /cluster/emit-ack                  io.timeout(8000).emit("ask", ack): every client's answer {count, error}
// Socket events: "join" (room, ack) joins a room locally.
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/cluster-adapter");
const { handler, onConnection, identity } = require("./app-common");

function json(res, code, obj) {
  const body = JSON.stringify(Object.assign({}, obj, identity()));
  res.writeHead(code, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}

let io;
function clusterHandler(req, res) {
  const url = new URL(req.url, "http://localhost");
  if (!url.pathname.startsWith("/cluster/")) return handler(req, res);
  const q = (k) => url.searchParams.get(k) || "";
  const fail = (err) => json(res, 500, { error: String((err && err.message) || err) });
  switch (url.pathname) {
    case "/cluster/emit":
      io.emit("bcast", { id: q("id"), from: identity() });
      return json(res, 200, {});
    case "/cluster/emit-binary": {
      const buf = Buffer.alloc(256);
      for (let i = 0; i < 256; i++) buf[i] = i;
      io.emit("bin", { id: q("id"), from: identity() }, buf);
      return json(res, 200, {});
    }
    case "/cluster/room-emit":
      io.to(q("room")).emit("room", { id: q("id"), room: q("room"), from: identity() });
      return json(res, 200, {});
    case "/cluster/sockets-join":
      io.socketsJoin(q("room"));
      return json(res, 200, {});
    case "/cluster/fetch": {
      const target = q("room") ? io.in(q("room")) : io;
      return target.fetchSockets().then((s) => json(res, 200, { count: s.length }), fail);
    }
    case "/cluster/sse":
      io.serverSideEmit("who", (err, responses) =>
        json(res, 200, { responses: responses || [], error: err ? String(err.message || err) : null })
      );
      return;
    case "/cluster/emit-ack":
      io.timeout(8000).emit("ask", (err, answers) =>
        json(res, 200, { count: (answers || []).length, error: err ? String(err.message || err) : null })
      );
      return;
  }
  json(res, 404, { error: "no such route" });
}

const httpServer = http.createServer(clusterHandler);
io = new Server(httpServer, { maxHttpBufferSize: 2e6 });
io.adapter(createAdapter());
io.on("who", (ack) => {
  if (typeof ack === "function") ack(identity());
});
io.on("connection", (socket) => {
  onConnection(socket);
  socket.on("join", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack(identity());
  });
});

if (process.env.STYLE === "sticky") {
  require("@socket.io/sticky").setupWorker(io);
  process.stderr.write(`cluster-app: sticky worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid}\n`);
} else {
  httpServer.listen(process.env.PORT || 3000, () => {
    process.stderr.write(`cluster-app: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} listening\n`);
  });
}
