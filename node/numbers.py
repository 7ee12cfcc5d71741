"""Whole numbers from client input (query parameters, header values), parsed so that none can fail.

`str.isdigit()` takes '²' and '٣', which `int()` refuses or reads as digits no client meant, and
`int()` refuses a text of more than 4,300 digits (Python's guard against slow conversions): either
would surface as a 500. Here only ASCII digits count, and past 18 of them a number is just HUGE,
larger than any size, offset or page a request can name.
"""

from __future__ import annotations

HUGE = 1 << 63
_MOST_DIGITS = 18  # below HUGE, so any longer number compares as at least as large as it is


def whole_number(text: str | bytes) -> int | None:
    """The value of a non-negative whole number in ASCII digits; HUGE for a very long one; None for anything else."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text) if len(text) <= _MOST_DIGITS else HUGE
