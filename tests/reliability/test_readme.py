"""The README's probe counts are those pytest collects."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_the_readme_counts_every_probe_file_and_its_cases():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(HERE)],
                         capture_output=True, text=True, cwd=HERE.parent.parent, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    collected = Counter(Path(line.split("::")[0]).name for line in out.stdout.splitlines() if "::" in line)
    rows = re.findall(r"^\| `(test_\w+\.py)` \|.*\| (\d+) \|$", (HERE / "README.md").read_text(), flags=re.M)
    listed = {name: int(n) for name, n in rows}
    collected.pop("test_readme.py", None)
    assert listed == dict(collected)
