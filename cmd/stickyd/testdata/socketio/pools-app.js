"use strict";
// pools-app.js — the worker-pools fixture (issue 15): one unmodified-style app, run as
// every worker of every pool (`stickyd run -pool 'reports:path=/reports/,…' -- node pools-app.js`).
//
//   socket.io: emits `hello` {worker,pid}; acks `echo` and `whoami` (app-common.js).
//   GET /reports/NAME: answers after REPORT_MS (5000) ms — a slow request that waits
//     (setTimeout), burning no CPU — with JSON
//     {name, pid, worker: $STICKYD_WORKER_ID, concurrent: N, started, ms}
//     where N is the number of /reports/ requests this process already had in progress
//     when this one arrived: with concurrency=1 per worker it must always be 0.
//   Any other path: app-common.js's routes (GET /whoami …).
const http = require("http");
const { Server } = require("socket.io");
const { handler, onConnection, identity } = require("./app-common");

const REPORT_MS = Math.max(0, Math.min(Number(process.env.REPORT_MS) || 5000, 600000));
let inProgress = 0;

function reports(req, res) {
  const concurrent = inProgress;
  inProgress++;
  const started = Date.now();
  let done = false;
  const finish = () => {
    if (!done) {
      done = true;
      inProgress--;
    }
  };
  const name = decodeURIComponent(new URL(req.url, "http://localhost").pathname.slice("/reports/".length));
  const timer = setTimeout(() => {
    const body = JSON.stringify(
      Object.assign({ name, concurrent, started, ms: Date.now() - started }, identity())
    );
    finish();
    res.writeHead(200, {
      "Content-Type": "application/json",
      "Content-Length": Buffer.byteLength(body),
    });
    res.end(body);
  }, REPORT_MS);
  res.on("close", () => {
    clearTimeout(timer);
    finish();
  });
}

const httpServer = http.createServer((req, res) => {
  if (req.method === "GET" && req.url.startsWith("/reports/")) {
    reports(req, res);
    return;
  }
  handler(req, res);
});
const io = new Server(httpServer);
io.on("connection", onConnection);

httpServer.listen(process.env.PORT || 3000, () => {
  process.stderr.write(`pools-app: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} listening\n`);
});
