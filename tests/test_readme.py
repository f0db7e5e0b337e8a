"""The README's Python example runs as written, and its commands name real configs."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CONF = Path(__file__).resolve().parents[1] / "conf"


def test_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_config_options_in_readme_exist():
    for group, option in re.findall(r"\b(task|search_space|model|algorithm|inner|optim|experiment)=(\w+)", README):
        if option in ("mine",):  # the user's own config in the plug-in example
            continue
        assert (CONF / group / f"{option}.yaml").is_file(), f"{group}={option}"
