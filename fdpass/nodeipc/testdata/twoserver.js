// Two servers: a front on argv[2] that forwards to the app's own target on argv[3] (like an
// http-proxy front). The front is the app server (first listen); the target must really serve.
'use strict';
const http = require('http');
const front = Number(process.argv[2]);
const target = Number(process.argv[3]);
http.createServer((req, res) => {
  http.get({ host: '127.0.0.1', port: target, path: req.url }, (r) => {
    let body = '';
    r.on('data', (d) => { body += d; });
    r.on('end', () => res.end(`front(${body.trim()})\n`));
  }).on('error', (e) => { res.statusCode = 502; res.end(String(e)); });
}).listen(front, () => {
  http.createServer((req, res) => res.end(`target ${req.url}\n`)).listen(target);
});
