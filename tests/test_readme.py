"""The README's Python examples run as written (every ```python block, in order, in one namespace)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 2


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    ns = {"__name__": "__readme__"}
    for i, code in enumerate(_blocks()):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), ns)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
