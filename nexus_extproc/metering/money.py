"""Money is integer micro-dollars everywhere inside; USD decimals exist only at the edges.

Float sums drift (LiteLLM's Redis INCRBYFLOAT counters did); integers add exactly and store atomically.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_HALF_UP, Decimal

MICROS_PER_USD = 1_000_000


def usd_to_micros(usd: Decimal | int | str) -> int:
    return int((Decimal(usd) * MICROS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def ceil_micros(usd_micros: Decimal) -> int:
    """A request's cost rounds up to the next micro-dollar: never under-charge by rounding."""
    return int(usd_micros.to_integral_value(rounding=ROUND_CEILING))


def micros_to_usd(micros: int) -> Decimal:
    return Decimal(micros) / MICROS_PER_USD


def format_usd(micros: int, places: int | None = None) -> str:
    """`0.0042`-style string for headers; `places` fixes the decimals (rounded down, so 'remaining' never
    overstates)."""
    d = micros_to_usd(micros)
    if places is None:
        s = format(d.normalize(), "f")
        return s if "." in s or s != "-0" else "0"
    return format(d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN), "f")


def usd_float(micros: int) -> float:
    """For JSON and Prometheus only, where a float is the wire type; never summed."""
    return micros / MICROS_PER_USD
