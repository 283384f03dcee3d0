"""Smoke test of every benchmark: `bench/bench_*.py --quick` and `bench/e2e.py --quick` on CPU (Triton in the
interpreter) must exit 0 and write a well-formed CSV (the columns of bench/_common.py, >= 1 row, numeric
median_us > 0, device labelled cpu).

New benches are covered automatically (glob). Each runs in a subprocess with CUDA hidden and its results
redirected to a temporary folder (KANGAROO_BENCH_RESULTS), so bench/results is left alone.
"""

import csv
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = sorted(glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))) + [os.path.join(ROOT, "bench", "e2e.py")]


def _columns():
    spec = importlib.util.spec_from_file_location("_bench_common", os.path.join(ROOT, "bench", "_common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.COLUMNS)


def test_benches_found():
    names = {os.path.basename(p) for p in BENCHES}
    for want in ("bench_verify_greedy.py", "bench_verify_sample.py", "bench_compact_kv.py", "bench_build_tree.py",
                 "bench_append_attention.py", "bench_adapter_forward.py", "bench_lm_head_exit.py", "e2e.py"):
        assert want in names


@pytest.mark.parametrize("script", BENCHES, ids=[os.path.basename(p)[:-3] for p in BENCHES])
def test_bench_quick_writes_csv(script, tmp_path):
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", KANGAROO_BENCH_RESULTS=str(tmp_path),
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env.pop("KANGAROO_BENCH_BUDGET_S", None)
    proc = subprocess.run([sys.executable, script, "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"{os.path.basename(script)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    csvs = sorted(glob.glob(os.path.join(str(tmp_path), "*.csv")))
    assert csvs, f"no CSV written by {os.path.basename(script)}:\n{proc.stdout[-2000:]}"
    columns = _columns()
    for path in csvs:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = [dict(zip(header, r)) for r in reader]
        assert header == columns, f"{path}: header {header} != {columns}"
        assert rows, f"{path}: no rows"
        for r in rows:
            assert float(r["median_us"]) > 0, r
            assert r["device"].lower().startswith("cpu"), r
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert glob.glob(os.path.join(str(tmp_path), "*.png")), "matplotlib is installed but no plot was written"


def test_e2e_cpu_quick_writes_its_csv(tmp_path):
    """bench/e2e_cpu.py (the CPU cycle-cost benchmark, its own CSV layout) runs end to end in --quick mode: every
    metric of the demo8 shape is written and numeric, and its output equals transformers' (exit status 0)."""
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", KANGAROO_BENCH_RESULTS=str(tmp_path), MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "e2e_cpu.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"e2e_cpu.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(os.path.join(str(tmp_path), "e2e_cpu.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    got = {r["metric"]: r["value"] for r in rows if r["shape"] == "demo8"}
    for m in ("plain_vs_hf", "accept100", "draft", "verify5", "tokens_per_cycle", "decode_us"):
        assert float(got[m]) > 0, (m, got.get(m))
    assert got["identical_to_hf"] == "True"
    assert "draft_head_int8" in got


def test_e2e_lookup_cpu_quick_writes_its_csv(tmp_path):
    """bench/e2e_lookup_cpu.py (Kangaroo + lookup vs Kangaroo alone on the shipped model) runs end to end in --quick
    mode: its ratios are written and positive, and every method's output equals plain decoding (exit status 0)."""
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", KANGAROO_BENCH_RESULTS=str(tmp_path), MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "e2e_lookup_cpu.py"), "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"e2e_lookup_cpu.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(os.path.join(str(tmp_path), "e2e_lookup_cpu.csv"), newline="") as f:
        got = {r["metric"]: r["value"] for r in csv.DictReader(f)}
    for m in ("plain_tokens_per_s", "kangaroo_tokens_per_s", "hybrid_over_kangaroo", "nomatch_over_kangaroo",
              "nomatch_over_kangaroo_prompt_min"):
        assert float(got[m]) > 0, (m, got.get(m))
    assert got["identical_to_plain"] == "True"
