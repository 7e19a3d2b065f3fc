"""The operations guide stays true to the code."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_every_metric_is_documented() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    names = [
        m._name
        for m in vars(observability).values()
        if hasattr(m, "_name") and str(getattr(m, "_name", "")).startswith("segments_")
    ]
    assert names
    for name in names:
        assert name in text, name
