"""`pytest benchmarks/` keeps working: every benchmark body runs once (timing disabled).

The ratio and refresh tables are left out: they time for about a minute and rewrite
``benchmarks/results/``; run them with ``pytest benchmarks/``.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmarks_run_once_each():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks", "--benchmark-disable",
         "-k", "not table"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
