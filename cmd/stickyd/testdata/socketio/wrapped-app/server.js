"use strict";
// The app `npm start` runs: the socket.io fixture app of ../server-listen.js (its packages
// come from ../node_modules). Under `stickyd run -- npm start` it is a grandchild of the
// worker process (npm → sh → node); it must still get the edge's connections.
require("../server-listen.js");
