"use strict";
// The same app written for @socket.io/sticky: setupWorker(io) and NO listen().
// The primary (stickyd, or sticky-primary.js for the baseline) hands it
// connections with {type: "sticky:connection"} messages over the IPC channel.
const http = require("http");
const { Server } = require("socket.io");
const { setupWorker } = require("@socket.io/sticky");
const { handler, onConnection } = require("./app-common");

const httpServer = http.createServer(handler);
const io = new Server(httpServer, { maxHttpBufferSize: 2e6 });
setupWorker(io);
io.on("connection", onConnection);

process.stderr.write(
  `server-sticky: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} ready\n`
);
