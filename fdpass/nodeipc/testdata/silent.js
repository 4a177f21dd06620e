// Reads the IPC fd itself (NODE_CHANNEL_FD deliberately unset) and never answers: a hung worker.
'use strict';
const net = require('net');
const s = new net.Socket({ fd: 3, readable: true, writable: false });
s.on('data', () => {});
setInterval(() => {}, 1 << 30);
