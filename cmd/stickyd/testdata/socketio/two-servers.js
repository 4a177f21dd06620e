"use strict";
// The seeds' two-server app (node-http-proxy example): a front server on
// FRONT_PORT that proxies every request to a target server on TARGET_PORT in
// the same process. Hand-written proxy with http.request (no extra package).
// The target answers "target ok <worker>".
const http = require("http");

const FRONT_PORT = Number(process.env.FRONT_PORT || 8000);
const TARGET_PORT = Number(process.env.TARGET_PORT || 9000);
const WORKER = process.env.STICKYD_WORKER_ID;

// Front: proxy to the target.
http
  .createServer((req, res) => {
    const preq = http.request(
      {
        host: "127.0.0.1",
        port: TARGET_PORT,
        method: req.method,
        path: req.url,
        headers: Object.assign({}, req.headers, { host: `127.0.0.1:${TARGET_PORT}` }),
      },
      (pres) => {
        res.writeHead(pres.statusCode, pres.headers);
        pres.pipe(res);
      }
    );
    preq.on("error", (err) => {
      if (!res.headersSent) {
        res.writeHead(502, { "Content-Type": "text/plain" });
      }
      res.end(`proxy error: ${err.message}\n`);
    });
    req.pipe(preq);
  })
  .listen(FRONT_PORT);

// Target.
http
  .createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      res.writeHead(200, { "Content-Type": "text/plain" });
      res.end(`target ok ${WORKER}\n`);
    });
  })
  .listen(TARGET_PORT);
