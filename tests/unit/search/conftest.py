"""Fixtures of the search / annotate CLI tests; videos, indexes, checkpoints and the demo corpus
come from tests/unit/conftest.py."""
from __future__ import annotations

import pytest


@pytest.fixture()
def cli(capsys):
    """``run(*argv) -> (exit code, stdout, stderr)`` of ``lavis-c2f``."""
    import lavis_c2f.cli as main_cli

    def run(*argv):
        capsys.readouterr()
        code = main_cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
