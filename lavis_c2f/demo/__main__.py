"""``python -m lavis_c2f.demo [options]`` = ``lavis-c2f demo [options]``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from lavis_c2f.common.errors import ConfigError, DataFormatError
    from lavis_c2f.demo.cli import register

    parser = argparse.ArgumentParser(prog="lavis-c2f")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo"] + list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataFormatError, FileNotFoundError) as e:
        print(f"lavis-c2f demo: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
