"""The operations guide stays true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from service import observability
from service.settings import DOCS, Settings, markdown_table

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented() -> None:
    assert set(DOCS) == set(Settings.__struct_fields__)


def test_configuration_table_is_current() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = re.search(r"<!-- settings:begin -->\n(.*)\n<!-- settings:end -->", text, re.S)
    assert table is not None
    assert table.group(1) == markdown_table(), "run: python -m service.settings"


def _families() -> list[MetricWrapperBase]:
    return [
        m
        for m in vars(observability).values()
        if isinstance(m, MetricWrapperBase) and m._name.startswith("segments_")
    ]


def test_every_metric_is_documented() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    families = _families()
    assert families
    for family in families:
        # As exposed: counters with _total.
        name = family._name + ("_total" if family._type == "counter" else "")
        assert f"`{name}" in text, name


def test_every_metric_is_exposed_by_some_process() -> None:
    exposed = {m for families in observability.FAMILIES.values() for m in families}
    assert set(_families()) == exposed
