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
                              progress=False, threads=1)
    assert len(res["rows"]) == res["n_prompts"] == 2
    ours = {k: v for k, v in res["methods"].items() if v["ours"]}
    assert len(ours) == 4 and all(v["identical"] == 2 for v in ours.values())
    for k, v in ours.items():
        if "tokens_per_cycle" in v:
            assert 1.0 <= v["tokens_per_cycle"] <= 5.0, k
    text = demo.format_results(res)
    assert "identical output: plain greedy 2/2, Kangaroo, sequence 2/2, Kangaroo, tree 2/2" in text
    assert demo.plot_results(res, tmp_path / "demo.png").stat().st_size > 1000


def test_goal_lines_say_met_and_missed():
    def m(tps, ours, tpc=None, ident=4):
        d = {"tps": tps, "ours": ours, "identical": ident, "speedup": tps / 100}
        if tpc is not None:
            d["tokens_per_cycle"] = tpc
        return d

    res = {"n_prompts": 4, "methods": {"plain greedy (this library)": m(100, True),
                                        "Kangaroo, sequence (this library)": m(170, True, 2.6),
                                        "transformers prompt_lookup_num_tokens=10": m(160, False)}}
    lines = demo.goal_lines(res)
    assert lines[0].startswith("  [met] identical") and "[met] tokens per cycle >= 2.5: 2.60" in lines[1]
    assert "[met] Kangaroo >= 1.6x our plain decoding: 1.70x" in lines[2]
    assert "[MISSED] Kangaroo >= 1.1x the fastest transformers peer: 1.06x" in lines[3]
    res["methods"]["Kangaroo, sequence (this library)"]["identical"] = 3
    assert demo.goal_lines(res)[0].startswith("  [MISSED] identical")


def test_shipped_model_matches_its_manifest():
    """The default model in the package: every file's sha256 as the manifest says, and the adapter belongs to the
    shipped base (its recorded fingerprint is the base's LM head)."""
    root = demo.shipped_dir()
    if not (root / "manifest.json").exists():
        pytest.fail(f"no shipped default model in {root}")
    assert demo.check_shipped(root) == []
    from kangaroo.adapter import KangarooAdapter
    from kangaroo.model import LlamaModel

    base = LlamaModel.from_pretrained(str(root / "base"), dtype=torch.float32)
    ad = KangarooAdapter.from_pretrained(str(root / "adapter"), base_model=base)
    assert ad.base_fingerprint == base.fingerprint()
    man = __import__("json").loads((root / "manifest.json").read_text())
    for key in ("command", "code_revision", "corpus", "machine", "lm_train", "adapter_train", "adapter_report",
                "tuned", "files"):
        assert key in man, key
    size = sum((root / f).stat().st_size for f in man["files"])
    assert size <= 40e6


def test_check_shipped_catches_a_modified_file(tmp_path):
    root = tmp_path / "m"
    (root / "base").mkdir(parents=True)
    (root / "base" / "config.json").write_text("{}")
    files = {"base/config.json": demo.sha256_of(root / "base" / "config.json")}
    (root / "manifest.json").write_text(__import__("json").dumps({"files": files}))
    missing = set(demo.SHIPPED_FILES) - set(files)
    assert set(demo.check_shipped(root)) == missing
    (root / "base" / "config.json").write_text("{ }")
    assert "base/config.json" in demo.check_shipped(root)


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
           "--no-progress", "--out-dir", str(tmp_path / "out")]
    first = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[3/3] adapter" in first.stdout and "identical output: plain greedy 3/3" in first.stdout
    second = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "[2/3]" not in second.stdout and "identical output: plain greedy 3/3" in second.stdout
    assert "transformers greedy" in second.stdout


def test_retrain_adapter_trains_only_the_adapter_on_the_shipped_base(tmp_path):
    """`kangaroo demo --retrain-adapter`: the shipped tokenizer and base copied unchanged into the cache, a new
    adapter trained and evaluated there, the base's build command kept and the adapter's recorded beside it."""
    rc = demo.cli_main(["--retrain-adapter", "--cache-dir", str(tmp_path), "--adapter-minutes", "0.02",
                        "--adapter-steps", "3", "--adapter-min-steps", "3", "--build-only", "--no-progress"])
    assert rc == 0
    (cache,) = list(tmp_path.iterdir())
    for rel in ("base/model.safetensors", "tokenizer/tokenizer.json"):
        assert demo.sha256_of(cache / rel) == demo.sha256_of(demo.shipped_dir() / rel)
    assert (cache / "adapter" / "adapter.safetensors").exists()
    man = __import__("json").loads((cache / "manifest.json").read_text())
    shipped = __import__("json").loads((demo.shipped_dir() / "manifest.json").read_text())
    assert man["command"] == shipped["command"] and man["lm_train"] == shipped["lm_train"]
    assert "--retrain-adapter" in man["adapter_command"] and man["adapter_train"]["steps"] == 3
    assert "heldout_top1_agreement" in man["adapter_report"]
    with pytest.raises(SystemExit):
        demo.cli_main(["--retrain-adapter", "--retrain", "--build-only"])
