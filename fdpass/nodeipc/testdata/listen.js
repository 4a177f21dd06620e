// Plain app: one HTTP server on a fixed port (argv[2]), answers with its pid and the request
// path; argv[3], when given, is server.maxConnections.
'use strict';
const http = require('http');
const port = Number(process.argv[2] || 3000);
const server = http.createServer((req, res) => {
  res.end(`hello ${req.url} from ${process.pid}\n`);
});
if (process.argv[3] !== undefined) server.maxConnections = Number(process.argv[3]);
server.listen(port);
