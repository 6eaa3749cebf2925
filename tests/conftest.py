"""Fixtures shared by the test modules; the plain functions behind them are in helpers.py."""

from __future__ import annotations

import pytest

from helpers import LighthouseCalls, count_lighthouse_calls


@pytest.fixture
def lighthouse_calls(monkeypatch) -> LighthouseCalls:
    """Counts the Lighthouse calls (single-device and context-parallel) made during the test."""
    return count_lighthouse_calls(monkeypatch.setattr)
