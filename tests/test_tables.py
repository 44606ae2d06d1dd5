"""The aligned terminal tables every command prints."""

import math

import pandas as pd

from triton_workbench.workbench.tables import format_table


def test_columns_align_numbers_right_text_left_and_lines_share_one_width():
    frame = pd.DataFrame({"kernel": ["gemm", "conv_fwd"], "time_ms": [1.23456, 10.0], "trials": [3, 120],
                          "note": ["ok", None]})
    lines = format_table(frame, float_format="{:.2f}").splitlines()
    assert lines[0].split() == ["kernel", "time_ms", "trials", "note"]
    assert set(lines[1]) == {"-", " "} and len({len(line) for line in lines}) == 1
    gemm, conv = lines[2], lines[3]
    assert gemm.startswith("gemm    ") and conv.startswith("conv_fwd")  # text left-aligned
    assert gemm.index("1.23") + 4 == conv.index("10.00") + 5  # numbers right-aligned, formatted
    assert gemm.index("  3") + 3 == conv.index("120") + 3


def test_missing_numbers_are_blank_and_an_empty_frame_says_so():
    lines = format_table(pd.DataFrame({"x": [1.5, math.nan]})).splitlines()
    assert lines[2].strip() == "1.5" and lines[3].strip() == ""
    assert format_table(pd.DataFrame()) == "(no rows)"
