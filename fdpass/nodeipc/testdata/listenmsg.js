// A plain listen app that also has its own process 'message' listener (e.g. for pm2-style
// graceful shutdown): the preload must not mistake it for a @socket.io/sticky worker.
'use strict';
process.on('message', (m) => { if (m === 'shutdown') process.exit(0); });
require('./listen.js');
