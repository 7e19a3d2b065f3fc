"""The pods' wait-for-migrations init container (deploy/kubernetes/) against a real
PostgreSQL: it finishes on a database at the migrations' head, and keeps waiting, saying
why, on one that is not (not migrated yet, or unreachable).

Its shell script runs as written in the manifest, with the repository standing in for the
image's /app and this venv's `alembic` on the PATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ["api.yaml", "consumer.yaml", "reconciler.yaml"]


def _scripts() -> list[list[str]]:
    found = []
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / name).read_text()):
            if doc and doc["kind"] == "Deployment":
                for c in doc["spec"]["template"]["spec"].get("initContainers", []):
                    if c["name"] == "wait-for-migrations":
                        found.append(c["command"])
    return found


def _run(command: list[str], database_url: str, timeout_s: float) -> tuple[int | None, str]:
    """Run the init container's command; (exit code or None if still waiting, output)."""
    argv = [arg.replace("/app/alembic.ini", str(ROOT / "alembic.ini")) for arg in command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_")}
    env["SEGMENTS_DATABASE_URL"] = database_url
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The manifest's own command (sh -c '<script>'), no input from elsewhere.
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the shell's children go with it
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


@pytest.fixture
async def empty_database(settings: Settings) -> AsyncIterator[str]:
    name = f"k8s_wait_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = settings.database_url.rpartition("/")
        yield f"{base}/{name}"
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def test_every_deployment_has_the_same_wait() -> None:
    scripts = _scripts()
    assert len(scripts) == len(MANIFESTS)
    assert all(s == scripts[0] for s in scripts)


def test_finishes_at_the_head(settings: Settings) -> None:
    code, out = _run(_scripts()[0], settings.database_url, timeout_s=60)
    assert code == 0, out


def test_waits_while_not_migrated(empty_database: str) -> None:
    code, out = _run(_scripts()[0], empty_database, timeout_s=6)
    assert code is None, f"did not wait: {code}\n{out}"
    assert "waiting for the migrations" in out, out


def test_waits_while_unreachable_and_says_why(settings: Settings) -> None:
    base, _, db = settings.database_url.rpartition("/")
    unreachable = base.rsplit(":", 1)[0] + ":1/" + db  # nothing listens on port 1
    code, out = _run(_scripts()[0], unreachable, timeout_s=6)
    assert code is None, f"did not wait: {code}\n{out}"
    assert "waiting for the migrations" in out and "onnect" in out, out
