"""The Lua scripts ship as package data: every one is found and holds a script."""

from __future__ import annotations

import hashlib
import importlib.resources as resources

from cache import scripts


def test_every_script_file_exists_and_is_loaded_verbatim() -> None:
    lua = resources.files("cache").joinpath("lua")
    for name, text in scripts.ALL.items():
        path = lua.joinpath(f"{name}.lua")
        assert path.is_file(), name
        assert text.strip(), name
        # The loaded text is the file's bytes unchanged: EVALSHA names a script by them.
        assert path.read_bytes() == text.encode(), name


def test_no_script_file_is_left_unreferenced() -> None:
    shipped = {p.name for p in resources.files("cache").joinpath("lua").iterdir()}
    assert shipped == {f"{name}.lua" for name in scripts.ALL}


def test_read_script_keeps_its_sha() -> None:
    # bench/redis_clients.py and running servers know the read script by this hash.
    assert hashlib.sha1(scripts.READ.encode()).hexdigest().startswith("7ee599ee77")
