"""`dsv3 report RUN_DIR`: draw a training run's metrics as PNG plots."""

from __future__ import annotations

import argparse

HELP = "PNG plots of a training run: losses, learning rate, tokens/s, expert loads, router biases, MaxVio"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of `dsv3 train`")
    parser.add_argument("--out", metavar="DIR", help="where the PNG files go (default: RUN_DIR/plots)")
    parser.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                        help="other runs whose losses to draw beside this one's (compare_loss.png)")


def run(args: argparse.Namespace) -> int:
    from dsv3.train.report import make_report

    for path in make_report(args.run_dir, args.out, args.compare):
        print(path)
    return 0
