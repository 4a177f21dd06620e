"use strict";
// An app that never calls listen(): for the spawn-timeout test. It stays alive
// (a timer keeps the event loop busy) until it is killed.
process.stderr.write(`never-listens: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} up, not listening\n`);
setInterval(() => {}, 1 << 30);
