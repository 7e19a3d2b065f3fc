"""Auth on the hot read: the front door (service/http/serving.py) checks tokens inside
its one layer (``observing`` with a gate), the app with its middleware; both answer
alike, and a token is found by the digest of what was presented."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp.test_utils import TestServer

from service.bootstrap import Container, api_app
from service.http.middleware import Auth, parse_tokens
from tests.conftest import ApiTestServer

TOKENS = {
    "reader": {"token": "r" * 32, "scopes": ["read"]},
    "writer": {"token": "w" * 32, "scopes": ["write"]},
    "other": {"token": "o" * 31 + "x", "scopes": ["read", "sync"]},
}
PATH = "/v1/users/7/segments"


@pytest.fixture
async def pair(clean: Container) -> AsyncIterator[tuple[TestServer, TestServer]]:
    """The API with tokens, served with the door (as `segments serve`) and without."""
    settings = msgspec.structs.replace(clean.settings, auth_tokens=orjson.dumps(TOKENS).decode())
    door = ApiTestServer(api_app(clean, settings), host="127.0.0.1")
    plain = TestServer(api_app(clean, settings), host="127.0.0.1")
    await door.start_server()
    await plain.start_server()
    yield door, plain
    await door.close()
    await plain.close()


async def _answer(server: TestServer, headers: dict[str, str]) -> tuple[object, ...]:
    url, sent = server.make_url(PATH), {"X-Request-Id": "r1", **headers}
    async with aiohttp.ClientSession() as s, s.get(url, headers=sent) as r:
        challenge, request_id = r.headers.get("WWW-Authenticate"), r.headers["X-Request-Id"]
        return r.status, challenge, request_id, await r.read()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer " + "r" * 32}, 200),
        ({"Authorization": "bearer " + "r" * 32}, 200),  # the scheme is case-insensitive
        ({"Authorization": "Bearer " + "o" * 31 + "x"}, 200),
        ({"Authorization": "Bearer " + "r" * 31}, 401),  # a prefix of a token
        ({"Authorization": "Bearer " + "r" * 33}, 401),
        ({"Authorization": "Basic " + "r" * 32}, 401),
        ({"Authorization": "Bearer \u00e9" + "r" * 31}, 401),  # not ASCII
        ({"Authorization": "Bearer " + "w" * 32}, 403),  # a token without the read scope
    ],
)
async def test_the_door_answers_auth_as_the_app_does(
    pair: tuple[TestServer, TestServer], headers: dict[str, str], status: int
) -> None:
    door, plain = pair
    answer = await _answer(door, headers)
    assert answer[0] == status
    assert answer == await _answer(plain, headers)


def test_each_token_finds_its_own_caller() -> None:
    auth = Auth(parse_tokens(orjson.dumps(TOKENS).decode()))
    for name, entry in TOKENS.items():
        found = auth._identify(str(entry["token"]))
        assert found is not None and found[0] == name
    assert auth._identify("r" * 31 + "w") is None
    assert auth._identify("") is None
    # A header aiohttp could not decode as UTF-8 arrives with surrogates: refused, not 500.
    assert auth._identify("\udcff" * 32) is None


def test_open_reads_need_no_gate_on_the_read_scope() -> None:
    auth = Auth(parse_tokens(orjson.dumps(TOKENS).decode()), open_reads=True)
    assert auth.gate("read") is None
    assert auth.gate("write") is not None
