"""The framework ceiling: a bare aiohttp handler returning a fixed JSON body."""

from __future__ import annotations

import sys

from aiohttp import web

BODY = b'{"user_id":1,"segments":["A","B","C","D","E"]}'


async def handler(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


if __name__ == "__main__":
    # The same event loop as the API workers (segments serve), for a fair ceiling.
    import uvloop

    uvloop.install()
    app = web.Application()
    app.router.add_get("/v1/users/{user_id}/segments", handler)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
