"use strict";
// A worker that will not stop: on SIGTERM its thread blocks for good (Atomics.wait, no CPU),
// so neither the signal nor the closed IPC channel can end it. Only SIGKILL does: a second
// SIGTERM to stickyd must deliver it.
require("../server-listen.js");
process.on("SIGTERM", () => {
  process.stderr.write(`stubborn: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} ignoring SIGTERM\n`);
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
});
