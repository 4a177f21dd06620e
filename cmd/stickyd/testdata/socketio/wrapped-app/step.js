"use strict";
// A step a start script runs before the app (a migration, a config check): a Node process
// of the worker's tree that is not the server. It must end as it would without stickyd, and
// the app after it must get the edge's channel.
process.stderr.write(`step: worker=${process.env.STICKYD_WORKER_ID} pid=${process.pid} done\n`);
