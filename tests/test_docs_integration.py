"""docs/integration.md's Python examples run as written (every ```python block, in order, in one namespace);
their asserts check the results they describe."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    with open(os.path.join(ROOT, "docs", "integration.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_integration_page_examples_run(tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 5
    ns = {"__name__": "__integration_doc__"}
    torch._dynamo.reset()
    try:
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"docs/integration.md python block {i}", "exec"), ns)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"docs/integration.md block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    finally:
        torch._dynamo.reset()
