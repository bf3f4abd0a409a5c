"""The building blocks of up-front validation: a condition, a choice, a numeric range, a table of ranges.

Each raises a one-line ``ConfigError`` naming the field. ``config_lib`` checks the fields every mode
shares with them; each task and each kind of loss term checks its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from hybrid_distill_jax.errors import ConfigError


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def one_of(value, choices, field: str) -> None:
    require(value in choices, f"{field}={value!r}: expected one of {list(choices)}")


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field (each element, for a tuple) may take: a finite number from ``lo`` to
    ``hi`` (each end included unless open), an integer if ``integer``; ``also`` holds the sentinel values
    outside that interval which mean something (described by ``note``)."""

    lo: float
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = True
    integer: bool = False
    also: tuple = ()
    note: str = ""

    def holds(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if v in self.also:
            return True
        if (self.integer and not isinstance(v, int)) or not math.isfinite(v):
            return False
        above = self.lo < v if self.open_lo else self.lo <= v
        return above and (v < self.hi if self.open_hi else v <= self.hi)

    def message(self, field: str, value) -> str:
        ends = ("(" if self.open_lo else "[", ")" if self.open_hi or self.hi == math.inf else "]")
        interval = f"{ends[0]}{self.lo:g}, {self.hi:g}{ends[1]}"
        what = f"be an integer in {interval}" if self.integer else f"lie in {interval}"
        if self.also:
            what = f"be {' or '.join(map(str, self.also))} or {what.removeprefix('be ')}"
        each = " (each element)" if isinstance(value, (tuple, list)) else ""
        note = f" ({self.note})" if self.note else ""
        return f"{field} must {what}{each}{note}, got {value!r}"


def ints(lo: int, note: str = "", also: tuple = ()) -> Range:
    return Range(lo, integer=True, also=also, note=note)


UNIT = Range(0.0, 1.0)  # [0, 1): ratios, mask ratios, betas, drop rates
PROBABILITY = Range(0.0, 1.0, open_hi=False)
POSITIVE = Range(0.0, open_lo=True)
NON_NEGATIVE = Range(0.0)


def check_ranges(section, ranges: Mapping[str, Range], prefix: str = "") -> None:
    """A ConfigError naming the first field of ``ranges`` (dotted names inside ``section``) outside its
    range. Fields ``section`` lacks, and unset optional ones (None), are skipped."""
    for name, allowed in ranges.items():
        value = section
        for key in name.split("."):
            value = value.get(key) if hasattr(value, "get") else None
        if value is None:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        require(all(map(allowed.holds, values)), allowed.message(prefix + name, value))
