// Unmodified @socket.io/sticky 2.0.1 worker: setupWorker(io), never listens.
'use strict';
const http = require('http');
const { Server } = require('socket.io');
const { setupWorker } = require('@socket.io/sticky');
const httpServer = http.createServer();
const io = new Server(httpServer);
setupWorker(io);
io.on('connection', (socket) => socket.emit('hello', process.pid));
