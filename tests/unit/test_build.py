"""Reproducible builds: the lock files, the venv made from them, and the Dockerfile.

requirements/dev.lock (everything `make test` and `make run` install) and
requirements/runtime.lock (the image's packages) are made by `make lock` from
pyproject.toml.  These tests fail when the two drift apart (a dependency added or
narrowed without re-locking), when the image would ship versions the tests did not run
on, or when the Dockerfile stops being pinned.
"""

from __future__ import annotations

import re
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DEV_LOCK = ROOT / "requirements" / "dev.lock"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"
BUILD_IN = ROOT / "requirements" / "build.in"
DOCKERFILE = ROOT / "Dockerfile"

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)"
    r"(?: ; (?P<marker>[^\\]+?))?\s*\\?$"
)


class Pin:
    def __init__(self, version: str, marker: str | None, hashes: list[str]) -> None:
        self.version, self.hashes = version, hashes
        self.marker = Marker(marker) if marker else None

    def applies(self) -> bool:
        """Installed on this machine (the lock is universal: some pins are Windows-only)."""
        return self.marker is None or self.marker.evaluate()


@cache
def lock(path: Path) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := _PIN.match(line):
            current = Pin(match["version"], match["marker"], [])
            pins[canonicalize_name(match["name"])] = current
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            current.hashes.append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
        elif line and not line.startswith((" ", "#")):
            raise AssertionError(f"{path.name}: unexpected line {line!r}")
    return pins


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirements(*extras: str) -> list[Requirement]:
    project = pyproject()["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return found


def pyproject_requirement(name: str) -> Requirement:
    """The runtime requirement on ``name`` in pyproject.toml."""
    for requirement in requirements():
        if canonicalize_name(requirement.name) == canonicalize_name(name):
            return requirement
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def _check_covers(path: Path, wanted: list[Requirement]) -> None:
    pins = lock(path)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{path.name} has no {name}: run `make lock`"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"{path.name} pins {name}=={pins[name].version}, pyproject.toml wants "
            f"{requirement}: run `make lock`"
        )
        for extra in requirement.extras:  # e.g. redis[hiredis], sqlalchemy[asyncio]
            for dep in metadata.requires(requirement.name) or []:
                dep_req = Requirement(dep)
                marker = dep_req.marker
                # Brought in by the extra only (not by the package anyway).
                if (
                    marker
                    and marker.evaluate({"extra": extra})
                    and not marker.evaluate({"extra": ""})
                ):
                    assert canonicalize_name(dep_req.name) in pins, (path.name, dep)


def test_dev_lock_covers_pyproject() -> None:
    build = [Requirement(r) for r in pyproject()["build-system"]["requires"]]
    _check_covers(DEV_LOCK, [*requirements("dev", "embedded"), *build])


def test_runtime_lock_covers_the_runtime_dependencies_only() -> None:
    build = [Requirement(r) for r in pyproject()["build-system"]["requires"]]
    _check_covers(RUNTIME_LOCK, [*requirements(), *build])
    test_only = {canonicalize_name(r.name) for r in requirements("dev", "embedded")} - {
        canonicalize_name(r.name) for r in requirements()
    }
    shipped = test_only & set(lock(RUNTIME_LOCK))
    assert not shipped, f"the image would ship test/dev packages: {sorted(shipped)}"


def test_the_image_ships_the_tested_versions() -> None:
    dev, runtime = lock(DEV_LOCK), lock(RUNTIME_LOCK)
    for name, pin in runtime.items():
        assert name in dev, f"runtime.lock has {name}, which the tests never install"
        assert pin.version == dev[name].version, (
            f"{name}: the image gets {pin.version}, the tests run {dev[name].version}"
        )
        assert set(pin.hashes) <= set(dev[name].hashes), name


def test_every_pin_has_hashes() -> None:
    for path in (DEV_LOCK, RUNTIME_LOCK):
        for name, pin in lock(path).items():
            assert pin.hashes, f"{path.name}: {name} has no hash"
            assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in pin.hashes), name


def test_build_in_is_the_build_system() -> None:
    listed = [
        line.strip()
        for line in BUILD_IN.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert listed == pyproject()["build-system"]["requires"]


def test_this_venv_is_the_lock() -> None:
    """What runs the tests is what the lock says (`make install` installs it)."""
    wrong = {}
    for name, pin in lock(DEV_LOCK).items():
        if not pin.applies():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if canonicalize_name(installed) != canonicalize_name(pin.version):
            wrong[name] = (installed, pin.version)
    assert not wrong, f"installed vs locked (run `make install`): {wrong}"


# --- The Dockerfile ------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    """Instructions, one a line (continuations joined, comments dropped)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def _base_images() -> list[str]:
    lines = _dockerfile()
    args = dict(
        line.removeprefix("ARG ").split("=", 1)
        for line in lines
        if line.startswith("ARG ") and "=" in line
    )
    images = []
    for line in lines:
        if line.startswith("FROM "):
            image = line.split()[1]
            if match := re.fullmatch(r"\$\{?(\w+)\}?", image):
                image = args[match[1]]
            images.append(image)
    return images


def test_docker_base_image_is_pinned_by_digest_and_python_is_the_tested_minor() -> None:
    images = _base_images()
    assert len(images) >= 2, "a multi-stage build: the runtime stage has no build leftovers"
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    for image in images:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), (
            f"{image}: pin the base image by digest"
        )
        tag = image.split("@")[0].split(":")[1]
        assert tag.startswith(f"{minor}-") or tag.startswith(f"{minor}."), (
            f"{image}: the tests run on Python {minor}"
        )
    assert pyproject()["tool"]["mypy"]["python_version"] == minor


def test_docker_installs_the_runtime_lock_with_hashes_and_runs_as_non_root() -> None:
    lines = _dockerfile()
    installs = [line for line in lines if "pip install" in line]
    assert installs, "no pip install"
    for line in installs:
        locked = "--require-hashes" in line and "runtime.lock" in line
        project_only = "--no-deps" in line and re.search(r"-e \.(\s|$)", line)
        assert locked or project_only, f"an install outside the lock: {line}"
    assert any("--require-hashes" in line and "runtime.lock" in line for line in installs)
    last_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    users = [line.split()[1] for line in last_stage if line.startswith("USER ")]
    assert users, "the runtime stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric and not root"
