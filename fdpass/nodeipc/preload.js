// stickyd nodeipc preload. The stickyd edge loads it into the Node workers it spawns
// (NODE_OPTIONS=--require <this file>, STICKYD_NODEIPC=1) and speaks Node's IPC protocol to them.
//
// It changes nothing the app can see. Each job is in its own function below:
//
//  1. stickydDetectStickyWorker: tell the edge when the app has installed @socket.io/sticky's
//     worker handler. setupWorker(io) adds a process 'message' listener that handles
//     "sticky:connection" and never calls listen(), so without this the edge could not know
//     that the worker is ready nor in which style to hand it connections. When such a listener
//     is added, this file sends {"cmd":"STICKYD","act":"sticky-ready"} on the IPC channel (a cmd
//     that starts with NODE_ is reserved for Node) and removes its own hook.
//  2. stickydCountWebSockets: report how many WebSockets the worker holds.
//  3. stickydReviveAdapterBuffers: give @socket.io/cluster-adapter its Buffers back (the edge
//     relays the adapter's messages between workers; JSON mode turns Buffers into objects).
//  4. stickydClientAddress: make the client's address the request's socket.remoteAddress on
//     connections from the edge that have none of their own (socketpairs).
//
// Harmless for other apps: 'newListener' listeners on process until detection, one wrapper
// around the http/https Server emit, and nothing at all unless STICKYD_NODEIPC=1 and an IPC
// channel exist. The variable is deleted so that the app's own child processes do not report
// to the app.
'use strict';
// Wrapped start commands (`npm start`, `yarn start`, `npx`, `sh -c 'node app.js'`, nodemon).
// stickydWrappedChannel runs before everything else in this file. Node consumes NODE_CHANNEL_FD
// and NODE_UNIQUE_ID at bootstrap, before preloads run, so when the edge spawns a wrapper it
// sets STICKYD_NODE_CHANNEL_FD / STICKYD_NODE_UNIQUE_ID instead: npm's own Node process (and
// yarn's, pnpm's, npx's, nodemon's) leaves them alone and they reach the app through the
// wrapper's children with the inherited descriptor. The first Node process of the tree that
// runs a main script that is not one of those CLIs is the app: it does here what Node's
// bootstrap would have done with NODE_CHANNEL_FD and NODE_UNIQUE_ID (the IPC channel, then the
// cluster worker), deletes the variables so that the app's own children do not take the
// channel, and sets STICKYD_NODEIPC=1 for the functions below.
(function stickydWrappedChannel() {
  const env = process.env;
  const fdText = env.STICKYD_NODE_CHANNEL_FD;
  if (!fdText) return;
  // No main script (node -e, node -p, the REPL) or a worker thread: not the app.
  if (!process.argv[1]) return;
  try {
    if (!require('worker_threads').isMainThread) return;
  } catch (_) {
    return;
  }
  if (stickydIsWrapperCLI(process.argv[1])) return;
  const fd = Number.parseInt(fdText, 10);
  const id = env.STICKYD_NODE_UNIQUE_ID || '1';
  delete env.STICKYD_NODE_CHANNEL_FD;
  delete env.STICKYD_NODE_UNIQUE_ID;
  if (!(fd >= 0)) return;
  // A wrapper that forks (nodemon) gave this process its own IPC channel. Node's handle
  // protocol listens for every channel on process ('internalMessage'): with a second channel
  // each handle the edge sends would be acknowledged and taken twice. The wrapper sends no
  // handles, so its listener goes; its channel stays open, and stickyd's replaces it as
  // process.send, which is what the cluster worker below and the app use.
  if (process.channel) process.removeAllListeners('internalMessage');
  require('child_process')._forkChild(fd, 'json');
  env.NODE_UNIQUE_ID = id;
  const cluster = require('cluster');
  cluster._setupWorker();
  delete env.NODE_UNIQUE_ID;
  env.STICKYD_NODEIPC = '1';
  // A cluster worker's channel keeps it alive. That is right for the app, but the first Node
  // process of the tree may be a step before it (`node migrate.js && node server.js`): it
  // must exit as it would without stickyd, and the next one takes the channel. So the channel
  // holds the process only once it serves: it listens (cluster._getServer) or listens for
  // messages (@socket.io/sticky's setupWorker, the app's own process.on('message')).
  const channel = process.channel;
  if (!channel || typeof channel.unref !== 'function') return;
  channel.unref();
  const hold = () => channel.ref();
  const getServer = cluster._getServer;
  if (typeof getServer === 'function') {
    cluster._getServer = function () {
      hold();
      return getServer.apply(this, arguments);
    };
  }
  process.on('newListener', (event) => {
    if (event === 'message') hold();
  });
})();

// stickydIsWrapperCLI tells whether main is the script of a CLI that starts the app as a child
// process: npm, npx, yarn (1.x and berry's .yarn/releases/yarn-*.cjs), pnpm, corepack,
// nodemon, node-dev, ts-node-dev.
function stickydIsWrapperCLI(main) {
  let real = main;
  try {
    real = require('fs').realpathSync(main);
  } catch (_) {}
  const p = real.split('\\').join('/');
  if (/\/node_modules\/(npm|yarn|pnpm|corepack|nodemon|node-dev|ts-node-dev|@yarnpkg\/cli-dist)\//.test(p)) return true;
  const base = p.slice(p.lastIndexOf('/') + 1);
  return /^(npm-cli|npx-cli|yarn|yarnpkg|pnpm|pnpx|corepack|nodemon)(\.c?js)?$/.test(base) || /^yarn-[0-9][^/]*\.c?js$/.test(base);
}

(function stickydPreload() {
  if (process.env.STICKYD_NODEIPC !== '1') return;
  delete process.env.STICKYD_NODEIPC;
  if (typeof process.send !== 'function') return;
  stickydDetectStickyWorker();
  stickydCountWebSockets();
  stickydReviveAdapterBuffers();
  stickydClientAddress();
})();

// @socket.io/sticky detection (see the top of the file).
function stickydDetectStickyWorker() {
  function onNewListener(event, listener) {
    if (event !== 'message' || typeof listener !== 'function') return;
    let src;
    try {
      src = Function.prototype.toString.call(listener);
    } catch (_) {
      return;
    }
    if (src.indexOf('sticky:connection') === -1) return;
    process.removeListener('newListener', onNewListener);
    // With a callback, a closed channel is reported there instead of as an 'error' event.
    process.send({ cmd: 'STICKYD', act: 'sticky-ready' }, () => {});
  }
  process.on('newListener', onNewListener);
}

// WebSocket count. The edge hands a WebSocket's socket to the worker and forgets it, so only
// the worker knows how many it holds; the edge needs the number for /admin/workers, the
// stickyd_websockets metric and to know when a draining worker is empty. Every connection
// that an http or https server hands to its 'upgrade' listeners (ws, engine.io — also in
// @socket.io/sticky's setupWorker style, whose sockets go through the same server) counts
// until the socket closes; a refused upgrade closes at once. The count is reported as
// {"cmd":"STICKYD","act":"websockets","n":N} when it changes, at most every 250 ms.
//
// This is the preload's only patch: Server.prototype.emit of http and https gets a wrapper
// that looks at the event name and calls the original. Servers with no 'upgrade' listener
// (Node destroys such sockets) are not counted.
function stickydCountWebSockets() {
  const INTERVAL_MS = 250;
  let open = 0;
  let reported = 0;
  let lastSent = 0;
  let timer = null;
  const counted = new WeakSet();

  function report() {
    timer = null;
    if (open === reported || !process.connected) return;
    reported = open;
    lastSent = Date.now();
    process.send({ cmd: 'STICKYD', act: 'websockets', n: open }, () => {});
  }
  function changed() {
    if (timer !== null) return;
    const wait = Math.max(0, lastSent + INTERVAL_MS - Date.now());
    timer = setTimeout(report, wait);
    if (typeof timer.unref === 'function') timer.unref();
  }
  function onClose() {
    open--;
    changed();
  }
  function track(socket) {
    if (!socket || typeof socket.once !== 'function' || counted.has(socket) || socket.destroyed) return;
    counted.add(socket);
    open++;
    socket.once('close', onClose);
    changed();
  }
  function wrap(proto) {
    const orig = proto && proto.emit;
    if (typeof orig !== 'function' || orig.__stickydWebSockets) return;
    const emit = function emit(event, req, socket) {
      if (event === 'upgrade' && this.listenerCount('upgrade') > 0) track(socket);
      return orig.apply(this, arguments);
    };
    emit.__stickydWebSockets = true;
    proto.emit = emit;
  }
  wrap(require('http').Server.prototype);
  wrap(require('https').Server.prototype);
}

// @socket.io/cluster-adapter in JSON serialization mode. The edge relays the adapter's
// messages between workers as Node's cluster primary would, but on a JSON channel a Buffer
// goes out as {"type":"Buffer","data":[...]} (Buffer.prototype.toJSON) and comes in as that
// plain object: a binary payload broadcast from another worker would reach its clients as an
// object. When the adapter adds its process 'message' listener, this one is put in front of
// it and turns such objects in the adapter's messages back into Buffers, so binary
// broadcasts, acks and fetchSockets data work as with serialization "advanced". (An app
// object that is literally {type:"Buffer", data:[bytes]} becomes a Buffer too.)
function stickydReviveAdapterBuffers() {
  const MAX_DEPTH = 64;
  function isBufferJSON(v) {
    if (v.type !== 'Buffer' || !Array.isArray(v.data)) return false;
    const keys = Object.keys(v);
    return keys.length === 2;
  }
  function revive(v, depth) {
    if (v === null || typeof v !== 'object' || depth > MAX_DEPTH || ArrayBuffer.isView(v)) return v;
    if (Array.isArray(v)) {
      for (let i = 0; i < v.length; i++) v[i] = revive(v[i], depth + 1);
      return v;
    }
    if (isBufferJSON(v)) return Buffer.from(v.data);
    for (const k of Object.keys(v)) v[k] = revive(v[k], depth + 1);
    return v;
  }
  function onAdapterMessage(msg) {
    if (msg !== null && typeof msg === 'object' && msg.source === '_sio_adapter' && msg.data) {
      revive(msg.data, 0);
    }
  }
  function onNewListener(event, listener) {
    if (event !== 'message' || typeof listener !== 'function') return;
    let src;
    try {
      src = Function.prototype.toString.call(listener);
    } catch (_) {
      return;
    }
    if (src.indexOf('MESSAGE_SOURCE') === -1 && src.indexOf('_sio_adapter') === -1) return;
    process.removeListener('newListener', onNewListener);
    // 'newListener' fires before the listener is added: prepending puts this one first.
    process.prependListener('message', onAdapterMessage);
  }
  process.on('newListener', onNewListener);
}

// Client address. Plain HTTP requests (engine.io long-polling included) reach the worker over
// socketpairs from the edge, which carry requests of different clients one after another, and
// so do the WebSockets the edge tunnels: their sockets have no peer address, and the app would
// see remoteAddress undefined. The edge writes the client's address in its own request field
// X-Stickyd-Client-Addr ("ip:port", port 0 when a trusted proxy named the client); it drops
// any field of that name a client sends, except in a tunnelled upgrade, where the client's
// comes after the edge's: the first value is the edge's.
//
// For every 'request', 'upgrade', 'connect', 'checkContinue' and 'checkExpectation' of an http
// or https server (a second wrapper around Server.prototype.emit), when the request's socket
// came from the edge (no IP peer: its handle is not TCP), its remoteAddress, remotePort and
// remoteFamily report that client from then until the next request on that socket, so that
// loggers that run after the response still see it (req.connection is the same object; the
// edge sends a socketpair its next request only after the answer to the previous one).
// engine.io reads req.connection.remoteAddress at the handshake, so socket.io's
// socket.handshake.address is the client too. A real TCP socket (the client's own, handed over
// for a WebSocket) keeps its true address: a field a client sent there is never believed. The
// field is removed from req.headers, req.headersDistinct and req.rawHeaders in every case, so
// apps never see it.
function stickydClientAddress() {
  const FIELD = 'x-stickyd-client-addr';
  const MAX_VALUE = 80; // "[" + 45-char IPv6 + zone + "]:65535"; longer is not the edge's
  const net = require('net');
  const kClient = Symbol('stickyd.clientAddress');
  // Sockets known to come from the edge: their own-property getters are installed.
  const fromEdge = new WeakSet();

  // parse turns the edge's "ip:port" / "[ipv6]:port" into {address, port, family}, or null.
  function parse(value) {
    if (typeof value !== 'string') return null;
    const comma = value.indexOf(',');
    const first = (comma === -1 ? value : value.slice(0, comma)).trim();
    if (first.length === 0 || first.length > MAX_VALUE) return null;
    const colon = first.lastIndexOf(':');
    if (colon <= 0) return null;
    let host = first.slice(0, colon);
    const portText = first.slice(colon + 1);
    if (!/^[0-9]{1,5}$/.test(portText)) return null;
    const port = Number(portText);
    if (port > 65535) return null;
    if (host[0] === '[') {
      if (host[host.length - 1] !== ']') return null;
      host = host.slice(1, -1);
      if (!net.isIPv6(host)) return null;
    } else if (!net.isIPv4(host)) {
      return null;
    }
    const family = net.isIPv4(host) ? 'IPv4' : 'IPv6';
    // Port 0: the client's port is unknown (a trusted proxy named the client), as Node says.
    return { address: host, port: port === 0 ? undefined : port, family };
  }

  // strip removes the field from the request as the app will see it and returns its value.
  // Node builds req.headers and req.headersDistinct lazily from the first kHeadersCount
  // entries of req.rawHeaders and then keeps them: both are built before rawHeaders gets
  // shorter, so that neither reads past its end.
  function strip(req) {
    const headers = req.headers;
    if (!headers || !Object.prototype.hasOwnProperty.call(headers, FIELD)) return undefined;
    const value = headers[FIELD];
    delete headers[FIELD];
    let distinct = null;
    try {
      distinct = req.headersDistinct; // Node >= 18.3
    } catch (_) {}
    if (distinct && typeof distinct === 'object') delete distinct[FIELD];
    const raw = req.rawHeaders;
    if (Array.isArray(raw)) {
      for (let i = raw.length - 2; i >= 0; i -= 2) {
        if (typeof raw[i] === 'string' && raw[i].length === FIELD.length && raw[i].toLowerCase() === FIELD) {
          raw.splice(i, 2);
        }
      }
    }
    return value;
  }

  // isEdgeSocket: a socketpair from the edge is a Pipe handle, which has no getpeername; a
  // TCP socket (also a closed or reset one) has, and a destroyed socket has no handle at all.
  // A server that listens on a path of its own is reachable by other local processes: its
  // sockets are not believed either.
  function isEdgeSocket(server, socket) {
    if (fromEdge.has(socket)) return true;
    if (!socket || socket.destroyed) return false;
    const handle = socket._handle;
    if (!handle || typeof handle.getpeername === 'function') return false;
    if (socket.remoteAddress !== undefined) return false;
    let own = null;
    try {
      own = typeof server.address === 'function' ? server.address() : null;
    } catch (_) {}
    if (typeof own === 'string') return false;
    fromEdge.add(socket);
    Object.defineProperty(socket, kClient, { configurable: true, enumerable: false, writable: true, value: null });
    const get = (k) => ({
      configurable: true,
      enumerable: false,
      get() {
        const c = this[kClient];
        return c ? c[k] : undefined;
      },
    });
    Object.defineProperty(socket, 'remoteAddress', get('address'));
    Object.defineProperty(socket, 'remotePort', get('port'));
    Object.defineProperty(socket, 'remoteFamily', get('family'));
    return true;
  }

  function onRequest(server, req) {
    if (!req || typeof req !== 'object') return;
    const value = strip(req);
    const socket = req.socket;
    if (!socket || (value === undefined && !fromEdge.has(socket))) return;
    if (!isEdgeSocket(server, socket)) return;
    // Every request on the socket sets it: one without the field shows no stale client.
    socket[kClient] = parse(Array.isArray(value) ? value[0] : value);
  }

  const EVENTS = new Set(['request', 'upgrade', 'connect', 'checkContinue', 'checkExpectation']);
  function wrap(proto) {
    const orig = proto && proto.emit;
    if (typeof orig !== 'function' || orig.__stickydClientAddress) return;
    const emit = function emit(event, req) {
      if (EVENTS.has(event)) {
        try {
          onRequest(this, req);
        } catch (_) {
          // Never break the app's request over the address.
        }
      }
      return orig.apply(this, arguments);
    };
    emit.__stickydClientAddress = true;
    proto.emit = emit;
  }
  wrap(require('http').Server.prototype);
  wrap(require('https').Server.prototype);
}
