"""The import contract: dependencies point inward.

Read from the source with ``ast`` (nothing is imported), so a forbidden import fails
here whether or not it would run:

- the domain (``service/domain``) imports no adapter, entry point or framework;
- adapters (storage, cache, CP, HTTP, Kafka, metrics) import no entry point;
- the runtime service does not import the embedded dev stack at module level (the
  production image installs it without the ``embedded`` extra), nor the benchmarks or
  the tests;
- the client package imports nothing of the service.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, dotted (absolute)
    line: int
    top_level: bool  # executed when the module is imported (not inside a def)


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, base: Path) -> list[Import]:
    module = _module_name(path, base)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")
                base_mod = ".".join(up[: len(up) - (node.level - 1)])
                prefix = f"{base_mod}.{node.module}" if node.module else base_mod
            else:
                prefix = node.module or ""
            # ``from a import b`` may import the module a.b: count both.
            targets = [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]
        found += [Import(module, t, node.lineno, id(node) not in nested) for t in targets]
    return found


def _all_imports(base: Path, *packages: str) -> list[Import]:
    out = []
    for package in packages:
        for path in sorted((base / package).rglob("*.py")):
            out += _imports(path, base)
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(
    imports: list[Import], importers: tuple[str, ...], forbidden: tuple[str, ...], *, top_only: bool
) -> list[str]:
    return sorted(
        {
            f"{i.module}:{i.line} imports {i.target}"
            for i in imports
            if _under(i.module, importers)
            and _under(i.target, forbidden)
            and (i.top_level or not top_only)
        }
    )


RUNTIME = ("service", "cache", "persistence")
ENTRY_POINTS = ("service.cli", "service.bootstrap", "service.reconciler")
ADAPTERS = (
    "cache",
    "persistence",
    "service.cp",
    "service.http",
    "service.ingest",
    "service.observability",
    "service.pg_metrics",
)
FRAMEWORKS = (
    "aiohttp",
    "aiokafka",
    "alembic",
    "asyncpg",
    "prometheus_client",
    "redis",
    "sqlalchemy",
    "uvloop",
)


@pytest.fixture(scope="module")
def runtime_imports() -> list[Import]:
    return _all_imports(ROOT, *RUNTIME)


def test_the_domain_imports_no_adapter_entry_point_or_framework(
    runtime_imports: list[Import],
) -> None:
    forbidden = (*ADAPTERS, *ENTRY_POINTS, *FRAMEWORKS, "service.settings", "devstack")
    assert _violations(runtime_imports, ("service.domain",), forbidden, top_only=False) == []


def test_adapters_import_no_entry_point(runtime_imports: list[Import]) -> None:
    assert _violations(runtime_imports, ADAPTERS, ENTRY_POINTS, top_only=False) == []


def test_the_runtime_loads_no_dev_stack_benchmark_or_test(runtime_imports: list[Import]) -> None:
    forbidden = ("devstack", "service.devstack", "bench", "tests", "loadtests")
    assert _violations(runtime_imports, RUNTIME, forbidden, top_only=True) == []


def test_the_client_package_imports_nothing_of_the_service() -> None:
    base = ROOT / "clients" / "python"
    imports = _all_imports(base, "user_segments_client")
    assert imports, "the client package has no imports: wrong path?"
    forbidden = (*RUNTIME, "devstack", "bench")
    assert _violations(imports, ("user_segments_client",), forbidden, top_only=False) == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # The rules above pass on an empty result; show the reader finds a real import,
    # relative and nested ones included.
    pkg = tmp_path / "service" / "domain"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(
        "import asyncpg\nfrom .. import cli\nfrom persistence import store\n"
        "def f():\n    from service.cli import main\n"
    )
    imports = _all_imports(tmp_path, "service")
    forbidden = ("asyncpg", "persistence", "service.cli")
    assert _violations(imports, ("service.domain",), forbidden, top_only=False) == [
        "service.domain.bad:1 imports asyncpg",
        "service.domain.bad:2 imports service.cli",
        "service.domain.bad:3 imports persistence",
        "service.domain.bad:3 imports persistence.store",
        "service.domain.bad:5 imports service.cli",
        "service.domain.bad:5 imports service.cli.main",
    ]
    assert _violations(imports, ("service.domain",), forbidden, top_only=True) == [
        "service.domain.bad:1 imports asyncpg",
        "service.domain.bad:2 imports service.cli",
        "service.domain.bad:3 imports persistence",
        "service.domain.bad:3 imports persistence.store",
    ]
