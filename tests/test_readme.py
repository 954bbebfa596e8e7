"""The README's quickstart runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_runs_as_written(mnist_dir, tmp_path):
    (quickstart,) = [b for b in python_blocks(README.read_text()) if "EWCCallback(" in b and "trainer.fit" in b]
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    env = {**os.environ, "LIGHTNING_EWC_DATA": str(mnist_dir)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "consolidated 5 tasks" in done.stdout
