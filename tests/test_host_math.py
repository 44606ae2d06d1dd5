"""The launchers' host-side integer math gives what Triton's constexpr functions give."""

import triton

from triton_workbench.kernels.host_math import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for n in (*range(-9, 70), 1023, 1024, 1025, 2**31 - 1, 2**31, 3 * 2**40 + 5):
        assert next_power_of_2(max(n, 0)) == triton.next_power_of_2(max(n, 0)), n
        for b in (1, 2, 3, 7, 16, 64, 128, 4096):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
