"""Integer math for grids and tiles on the host: `triton.cdiv` and `triton.next_power_of_2` are constexpr
functions, whose calls from Python cost about 2 us each (a ResNet-18 training step's launchers made some 700);
these give the same results for the ints the launchers pass, at Python's own cost."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a positive b, as `triton.cdiv`."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as `triton.next_power_of_2`."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
