"""An unmodified-style python-socketio server (Debian's python3-socketio with aiohttp)
that listens on its own port, for stickyd proxy's e2e tests: the same events as the Node
fixture app (testdata/socketio/app-common.js) so clients.js drives it unchanged.

    PORT=3000 STICKYD_WORKER_ID=0 /usr/bin/python3 server.py
"""
import os
import sys

import socketio
from aiohttp import web

WORKER = os.environ.get("STICKYD_WORKER_ID")


def identity():
    return {"worker": WORKER, "pid": os.getpid()}


sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=2_000_000, cors_allowed_origins="*")
app = web.Application()
sio.attach(app)


async def whoami_http(request):
    return web.json_response(identity())


app.router.add_get("/whoami", whoami_http)


@sio.event
async def connect(sid, environ, auth=None):
    await sio.emit("hello", identity(), to=sid)


@sio.event
async def echo(sid, payload):
    return payload


@sio.event
async def whoami(sid):
    return identity()


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "3000"))
    sys.stderr.write(f"python server: worker={WORKER} pid={os.getpid()} listening on {port}\n")
    # HOST=0.0.0.0 in a container (deploy/compose-proxy.yaml); loopback for the tests.
    web.run_app(app, host=os.environ.get("HOST", "127.0.0.1"), port=port, print=None, access_log=None)
