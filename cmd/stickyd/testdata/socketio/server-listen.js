"use strict";
// An unmodified-style socket.io v4 app that calls listen(). Under `stickyd run`
// it believes it is a cluster worker (stickyd emulates the cluster primary) and
// receives the connections stickyd routes to it.
const http = require("http");
const { Server } = require("socket.io");
const { handler, onConnection } = require("./app-common");

const httpServer = http.createServer(handler);
const io = new Server(httpServer, { maxHttpBufferSize: 2e6 });
io.on("connection", onConnection);

httpServer.listen(process.env.PORT || 3000, () => {
  const a = httpServer.address();
  process.stderr.write(
    `server-listen: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} listening on ${a && a.port}\n`
  );
});
