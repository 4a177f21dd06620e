// Client address app: answers every request and upgrade with what it saw of the client as JSON
// {remoteAddress, remotePort, remoteFamily, connection, field, rawField, hostOK}: connection is
// req.connection.remoteAddress, field and rawField whether X-Stickyd-Client-Addr was still in
// req.headers (or req.headersDistinct) / req.rawHeaders. Answers after a turn of the event
// loop, as real apps do.
'use strict';
const http = require('http');
const port = Number(process.argv[2] || 3000);
function seen(req) {
  const s = req.socket;
  return JSON.stringify({
    remoteAddress: s.remoteAddress === undefined ? null : s.remoteAddress,
    remotePort: s.remotePort === undefined ? null : s.remotePort,
    remoteFamily: s.remoteFamily === undefined ? null : s.remoteFamily,
    connection: req.connection.remoteAddress === undefined ? null : req.connection.remoteAddress,
    field: 'x-stickyd-client-addr' in req.headers || 'x-stickyd-client-addr' in req.headersDistinct,
    rawField: req.rawHeaders.some((h) => h.toLowerCase() === 'x-stickyd-client-addr'),
    // The other fields are intact in all three views.
    hostOK: req.headers.host === 'x' && (req.headersDistinct.host || [])[0] === 'x' &&
      req.rawHeaders.length % 2 === 0 && req.rawHeaders[req.rawHeaders.indexOf('Host') + 1] === 'x',
  });
}
const server = http.createServer((req, res) => {
  const body = seen(req);
  setImmediate(() => {
    res.setHeader('Content-Type', 'application/json');
    res.end(body + '\n');
  });
});
server.on('upgrade', (req, socket) => {
  const body = seen(req) + '\n';
  socket.end(`HTTP/1.1 200 OK\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
});
server.listen(port);
