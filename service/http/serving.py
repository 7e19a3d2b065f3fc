"""Serving the API: aiohttp's runner, with a front door for the hot read.

``GET /v1/users/{id}/segments`` is nearly all of this service's traffic.  aiohttp's
Application spends a good part of such a request in its own machinery: resolving the
route (match info, its freezing), building the middleware chain, and a middleware of its
own that it adds as soon as an app has any.  The front door takes that one route, with a
well-formed id, straight to the same handler through the same layers (``observing``,
auth, rate limit); every other request, a malformed id included, goes to the app
unchanged, so answers and errors are the app's.  Measured (one stack, the two servers
side by side, 4 alternating wrk rounds, API CPU a request): 99-110 us through the app,
78-92 us through the door.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest

from service.http.middleware import Handler

_PREFIX = "/v1/users/"
_SUFFIX = "/segments"
HOT_ROUTE = _PREFIX + "{user_id}" + _SUFFIX

AppHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


class FrontDoor:
    """The hot route's handler wrapped in its layers, ready to put in front of an app."""

    def __init__(
        self, layers: Sequence[Middleware], read: Callable[[str], Awaitable[web.StreamResponse]]
    ) -> None:
        # Plain functions that return the next awaitable rather than coroutines that
        # await it: each coroutine level costs a frame and a pass on every suspension
        # and resumption (figures in docs/performance.md).
        def handler(request: web.Request) -> Awaitable[web.StreamResponse]:
            return read(request.path[len(_PREFIX) : -len(_SUFFIX)])

        chain: Handler = handler
        for layer in reversed(layers):  # the first layer is the outermost, as in aiohttp
            chain = functools.partial(layer, handler=chain)
        self._chain = chain

    def before(self, app: AppHandler) -> AppHandler:
        """A request handler for aiohttp's low-level server: this route here, the rest
        to ``app``."""
        chain = self._chain

        def handle(request: BaseRequest) -> Awaitable[web.StreamResponse]:
            path = request.path
            if request.method == "GET" and path.startswith(_PREFIX) and path.endswith(_SUFFIX):
                raw = path[len(_PREFIX) : -len(_SUFFIX)]
                # ASCII digits only: anything else gets the app's own answer (so does
                # an Expect header, which aiohttp's app answers before the handler).
                if raw.isdigit() and raw.isascii() and "Expect" not in request.headers:
                    # The app's request factory makes web.Request objects.
                    return chain(cast(web.Request, request))
            return app(request)

        return handle


FRONT_DOOR = web.AppKey("front_door", FrontDoor)


class ApiRunner(web.AppRunner):
    """aiohttp's AppRunner with the app's front door (when it has one) in front."""

    async def _make_server(self) -> web.Server:
        # The runner's one hook for the server it builds (aiohttp's own runners
        # implement it); the server calls ``request_handler`` for each request.
        server = await super()._make_server()
        door = self.app.get(FRONT_DOOR)
        if door is not None:
            server.request_handler = door.before(server.request_handler)
        return server


async def serve(
    app: Awaitable[web.Application],
    *,
    host: str,
    port: int,
    reuse_port: bool = False,
    keepalive_timeout: float = 75.0,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully: stop accepting, let
    in-flight requests finish (up to aiohttp's shutdown timeout), run the app's
    clean-up (which closes the adapters)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = ApiRunner(await app, access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
