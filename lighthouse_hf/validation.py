"""Checks shared by every module that validates user input (no imports, so any module may use it)."""

from __future__ import annotations


def is_int(value: object) -> bool:
    """A true integer: ``bool`` is an ``int`` subclass but never a count or an index here."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return value


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value
