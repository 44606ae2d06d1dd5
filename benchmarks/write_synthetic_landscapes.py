"""Write the synthetic suite (autotune/synthetic.py) as Kernel Tuner cache files, for Kernel Tuner's
strategies to replay the same landscapes (benchmarks/kernel_tuner_baseline.py --landscapes DIR).

    python benchmarks/write_synthetic_landscapes.py /tmp/synthetic_landscapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from triton_workbench.autotune.synthetic import synthetic_suite, write_cache_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the suite's seed (default 0)")
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    for landscape in synthetic_suite(args.seed):
        print(write_cache_file(landscape, args.directory / f"{landscape.name}.json.gz"))


if __name__ == "__main__":
    main()
