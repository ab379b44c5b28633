"""Recipe tables (TOML) into config dataclasses: one place that refuses unknown keys instead of ignoring them."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

C = TypeVar("C")


def config_from_table(cls: type[C], data: dict[str, Any], what: str) -> C:
    """cls(**data), or a ValueError naming the unknown `what` settings and the known ones (a typo never passes)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}: the known ones are {sorted(known)}")
    return cls(**data)


def checked_temperature_range(value: Any) -> tuple[float, float] | None:
    """A per-dream temperature range as (low, high) floats, or a ValueError unless 0 < low <= high."""
    if value is None:
        return None
    low_high = tuple(float(t) for t in value)
    if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
        raise ValueError(f"temperature_range must be (low, high) with 0 < low <= high, got {value}")
    return low_high
