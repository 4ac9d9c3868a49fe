"""Shared fixtures: tiny, fast, deterministic configurations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import tiny_config_dict


@pytest.fixture
def tiny_config(tmp_path: Path) -> dict[str, Any]:
    return tiny_config_dict(tmp_path / "runs")
