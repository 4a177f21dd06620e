// Plain app: one HTTP server on a fixed port, answers with its pid and the request path.
'use strict';
const http = require('http');
const port = Number(process.argv[2] || 3000);
http.createServer((req, res) => {
  res.end(`hello ${req.url} from ${process.pid}\n`);
}).listen(port);
