"""The ``kunet`` command line: ``kunet demo`` (and more subcommands as they land)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kunet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from kunet import demo

    demo.add_arguments(sub.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
