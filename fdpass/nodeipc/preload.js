// stickyd nodeipc preload. The stickyd edge loads it into the Node workers it spawns
// (NODE_OPTIONS=--require <this file>, STICKYD_NODEIPC=1) and speaks Node's IPC protocol to them.
//
// It changes nothing in the app. Its only job: tell the edge when the app has installed
// @socket.io/sticky's worker handler. setupWorker(io) adds a process 'message' listener that
// handles "sticky:connection" and never calls listen(), so without this the edge could not know
// that the worker is ready nor in which style to hand it connections. When such a listener is
// added, this file sends {"cmd":"STICKYD","act":"sticky-ready"} on the IPC channel (a cmd that
// starts with NODE_ is reserved for Node) and removes its own hook.
//
// Harmless for other apps: one 'newListener' listener on process until detection, no patched
// functions, and nothing at all unless STICKYD_NODEIPC=1 and an IPC channel exist. The variable
// is deleted so that the app's own child processes do not report to the app.
'use strict';
(function stickydPreload() {
  if (process.env.STICKYD_NODEIPC !== '1') return;
  delete process.env.STICKYD_NODEIPC;
  if (typeof process.send !== 'function') return;
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
})();
