"""The embedded demo (kangaroo.demo): a tiny build + comparison (fast), and the CLI end to end (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kangaroo import demo

TINY = dict(demo.QUICK, tokenizer_bytes=200_000, corpus_bytes=300_000, lm_steps=30, adapter_steps=20)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cache_dir_names(tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path))
    assert demo.cache_dir_for(demo.DemoSizes()) == tmp_path / f"demo-{demo.DEMO_VERSION}"
    q = demo.cache_dir_for(demo.DemoSizes(**demo.QUICK))
    assert q.parent == tmp_path and q.name.startswith(f"demo-{demo.DEMO_VERSION}-")
    assert demo.cache_dir_for(demo.DemoSizes(), tmp_path / "x").parent == tmp_path / "x"


def test_tiny_build_is_cached_and_decodes_exactly(tmp_path, one_thread):
    sizes = demo.DemoSizes(**TINY)
    cache = demo.cache_dir_for(sizes, tmp_path)
    built = demo.ensure_model(sizes, cache, progress=False)
    assert built["built"]
    for f in ("base/config.json", "base/model.safetensors", "base/tokenizer.json", "adapter/adapter_config.json",
              "adapter/adapter.safetensors", "manifest.json"):
        assert (cache / f).exists(), f
    mtime = (cache / "adapter" / "adapter.safetensors").stat().st_mtime
    again = demo.ensure_model(sizes, cache, progress=False)
    assert not again["built"] and (cache / "adapter" / "adapter.safetensors").stat().st_mtime == mtime
    res = demo.run_comparison(again, n_prompts=2, new_tokens=12, threshold=0.3, max_draft=4, hf_peers=False,
                              progress=False)
    assert res["identical"] == len(res["rows"]) == 2
    assert 1.0 <= res["tokens_per_cycle"] <= 5.0
    assert "identical output: 2/2" in demo.format_results(res)


def _want_slow(request):
    return "slow" in (request.config.getoption("markexpr") or "") or os.environ.get("KANGAROO_RUN_SLOW") == "1"


@pytest.mark.slow
def test_demo_cli_end_to_end(tmp_path, request):
    """`kangaroo demo --quick` in a fresh process and an empty cache, then again from the cache.
    Runs with `-m slow` or KANGAROO_RUN_SLOW=1 (not in CI)."""
    if not _want_slow(request):
        pytest.skip("slow: run with -m slow or KANGAROO_RUN_SLOW=1")
    env = dict(os.environ, KANGAROO_CACHE=str(tmp_path))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "kangaroo.cli", "demo", "--quick", "--prompts", "3", "--new-tokens", "32",
           "--no-progress", "--json", str(tmp_path / "res.json")]
    first = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[3/3] adapter" in first.stdout and "identical output: 3/3" in first.stdout
    second = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "[2/3]" not in second.stdout and "identical output: 3/3" in second.stdout
    assert "transformers greedy" in second.stdout
