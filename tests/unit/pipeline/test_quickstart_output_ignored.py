"""The quickstart's default output (``./c2f_quickstart/<timestamp>``, run from the checkout by
run_scripts/quickstart.sh) is ignored by git, so ``git status`` stays clean after a quickstart."""
import shutil
import subprocess
from pathlib import Path

import pytest

from lavis_c2f.pipeline.quickstart_run import DEFAULT_ROOT, QuickstartRun

REPO = Path(__file__).resolve().parents[3]


def test_default_run_directory_is_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    run = QuickstartRun.new()
    rel = Path(run.path).relative_to(Path.cwd().resolve())
    assert rel.parts[0] == DEFAULT_ROOT
    for sub in ("summary.json", "runs/stage1/checkpoint_best.pth", "corpus/corpus.json"):
        r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(Path(DEFAULT_ROOT, *rel.parts[1:], sub))])
        assert r.returncode == 0, f"{DEFAULT_ROOT}/.../{sub} is not ignored by .gitignore"
