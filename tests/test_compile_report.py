"""Every Triton kernel compiles for a real GPU target, without a GPU, and ptxas allocates it without spills.

The interpreter tests check what the kernels compute; they never lower them. bench/compile_report.py compiles
the kernels through Triton's full pipeline for sm_90 (H100) with the launch configs the GPU path picks, at model
shapes, and reads ptxas's resource usage. Here: it exits 0, covers every kernel, reports zero spill bytes and
shared memory within the H100's limit; and a deliberately spilling kernel is reported as spilling (the check can
fail). Each runs in a subprocess: the test process has TRITON_INTERPRET=1 set, which would define interpreted
kernels.
"""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "compile_report.py")
KERNELS = {"_lm_head_block_kernel", "_lm_head_exit_merge_kernel", "_lm_head_probs_kernel",
           "_lm_head_topk_merge_kernel", "_lm_head_filter_kernel", "_append_attention_kernel",
           "_append_attention_merge_kernel",
           "_adapter_qkv_kernel", "_adapter_out_kernel", "_adapter_out_norm_kernel"}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _run(args, **kw):
    pytest.importorskip("triton")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900, **kw)


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "compile_report.csv"
    res = _run([SCRIPT, "--set", "ci", "--arch", "90", "--csv", str(out)])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = list(csv.DictReader(open(out)))
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        where = f"{r['kernel']} ({r['case']})"
        assert r["arch"] == "sm_90"
        assert int(r["spill_bytes"]) == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert 0 < int(r["regs"]) <= 255, where
        assert int(r["shared"]) <= 232448, where  # 227 KB: the H100's per-block limit
        assert r["ok"] == "True", where
    # launch configs were the GPU ones, not the interpreter's (which take 2048-row vocabulary blocks, 4 warps)
    blk = [r for r in rows if r["kernel"] == "_lm_head_block_kernel" and "B=16" in r["case"]]
    assert blk and all(int(r["num_warps"]) == 8 for r in blk)


_CONTROL = r"""
import sys
import torch, triton, triton.language as tl
sys.path.insert(0, "bench")  # cwd is the repository root
import compile_report as cr

@triton.jit
def _softmax_rows(X, Y, M: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(X + offs)
    y = tl.exp(x - tl.max(x, axis=1)[:, None])
    tl.store(Y + offs, y / tl.sum(y, axis=1)[:, None])

x = torch.empty(64, 256)
for warps in (1, 8):  # 16K live fp32 values: 512 a thread at 1 warp (must spill), 64 at 8 warps
    k = cr.compile_only(_softmax_rows, (x, x), dict(M=64, N=256, num_warps=warps), arch=90)
    u = cr.resource_usage(k.asm["ptx"], 90)
    print(warps, u["spill_stores"] + u["spill_loads"])
"""


def test_spill_check_catches_a_spilling_kernel(tmp_path):
    script = tmp_path / "spill_control.py"  # Triton reads a kernel's source from its file
    script.write_text(_CONTROL)
    res = _run([str(script)])
    assert res.returncode == 0, res.stderr[-4000:]
    spills = dict(line.split() for line in res.stdout.strip().splitlines())
    assert int(spills["1"]) > 0, "a 1-warp kernel holding 512 fp32 values a thread must be reported as spilling"
    assert int(spills["8"]) == 0
