"use strict";
// The @socket.io/sticky style app (setupWorker, no listen()) of ../server-sticky.js, started
// by `npm run start:sticky`.
require("../server-sticky.js");
