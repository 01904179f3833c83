"""How figures are written for people, the same way in every command, the report and its HTML.

Sizes: exact bytes with the binary human form beside them, "179,709 B (175.5 KiB)" (JSON keeps the
integer bytes). Speed: the ratio of two medians as "1.12x faster" or "4.41x slower", always of
the model against its baseline (fp32, or benchmark's --against), never a bare "0.23x".
"""
from __future__ import annotations

__all__ = ["fmt_bytes", "fmt_speed"]

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def fmt_bytes(n: int | float, exact: bool = True) -> str:
    """`n` bytes as "179,709 B (175.5 KiB)"; below 1 KiB just "512 B".

    exact=False: the human form alone ("175.5 KiB"), for figures that are not exact counts (memory).
    """
    n = int(round(n))
    if abs(n) < 1024:
        return f"{n:,} B"
    value, unit = float(n), "B"
    for unit in _UNITS:
        value /= 1024
        if abs(value) < 1024:
            break
    return f"{n:,} B ({value:.1f} {unit})" if exact else f"{value:.1f} {unit}"


def fmt_speed(speedup: float) -> str:
    """`speedup` = baseline time / model time, as "1.12x faster" (>= 1) or "4.41x slower" (< 1)."""
    if speedup >= 1:
        return f"{speedup:.2f}x faster"
    return f"{1 / max(speedup, 1e-12):.2f}x slower"
