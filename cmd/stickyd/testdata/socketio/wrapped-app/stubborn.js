"use strict";
// A worker that will not stop: it outlives its closed IPC channel (a cluster worker exits
// when the channel goes; this one took that listener away), and on SIGTERM its thread blocks
// for good (Atomics.wait, no CPU). Only SIGKILL ends it: a second SIGTERM to stickyd must
// deliver it.
require("../server-listen.js");
process.removeAllListeners("disconnect");
process.on("disconnect", () => {});
process.on("SIGTERM", () => {
  process.stderr.write(`stubborn: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} ignoring SIGTERM\n`);
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
});
