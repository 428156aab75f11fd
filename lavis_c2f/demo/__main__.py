"""``python -m lavis_c2f.demo [options]`` = ``lavis-c2f demo [options]``."""
from __future__ import annotations

import sys
from typing import List, Optional

from lavis_c2f.cli import main as cli_main


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(["demo"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
