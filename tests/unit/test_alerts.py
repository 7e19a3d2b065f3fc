"""deploy/prometheus/alerts.yml: valid rules (promtool check), their unit tests
(promtool test rules deploy/prometheus/alerts_test.yml), and in step with the code and
the operations guide.

promtool comes with Debian's `prometheus` package; `make test` installs it (as root).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service import observability

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (make test installs Debian's prometheus package as root)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    # A fixed tool and arguments; the files are the repository's.
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60
    )


def _alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    done = _promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case where it fires and one where it does not (yet)."""
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in _alerts():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no quiet case"


def test_alerts_use_metrics_the_service_exposes_and_are_documented() -> None:
    families = {m._name for m in vars(observability).values() if hasattr(m, "_name")}
    exposed = set()
    for family in families:
        exposed |= {family, f"{family}_total", f"{family}_bucket", f"{family}_count"}
    docs = (ROOT / "docs" / "operations.md").read_text()
    for rule in _alerts():
        name, expr = str(rule["alert"]), str(rule["expr"])
        used = set(re.findall(r"\bsegments_[a-z0-9_]+", expr))
        assert used or "up{" in expr, name
        assert used <= exposed, (name, used - exposed)
        assert {"severity"} <= set(rule["labels"]), name  # type: ignore[call-overload]
        assert f"`{name}`" in docs, f"{name} is not described in docs/operations.md"
