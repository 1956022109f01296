"""Argument validators with precise messages (chex/attrs style).

Every message names the argument, what is allowed and the received value:
"`min_step` must be a float >= 0. Received: min_step=-1".
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional

IGNORE = "ignore"
WARN = "warn"
SKIP = "skip"
RAISE = "raise"
POLICIES = (IGNORE, WARN, SKIP, RAISE)


def check_policy(name: str, value: Any, allowed: Iterable[str] = POLICIES) -> str:
    """Returns `value` if it is one of `allowed` policies, else raises ValueError."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Returns `value` as a float if finite and within bounds, else raises."""
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>=' if min_inclusive else '>'} {minimum:g}")
    if maximum is not None:
        bounds.append(f"{'<=' if max_inclusive else '<'} {maximum:g}")
    what = "a finite float" + (" " + " and ".join(bounds) if bounds else "")
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
    if ok:
        v = float(value)
        if minimum is not None:
            ok = v >= minimum if min_inclusive else v > minimum
        if ok and maximum is not None:
            ok = v <= maximum if max_inclusive else v < maximum
    if not ok:
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return float(value)


def check_int(
    name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None
) -> int:
    """Returns `value` if it is an int within bounds, else raises ValueError."""
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    what = "an integer" + (" " + " and ".join(bounds) if bounds else "")
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return int(value)
