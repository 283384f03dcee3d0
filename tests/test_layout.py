"""The op library's layout: the spec and the result types import no op module (so calling the spec registers no
torch.library op), and public op names are never shadowed by module names."""

import subprocess
import sys

# Calls every public reference function on tiny inputs, then reports what got imported or registered.
_CALL_EVERY_REF = r"""
import sys, torch
import kangaroo_kernels.reference as R
from kangaroo_kernels.types import AdapterWeights

g = torch.Generator().manual_seed(0)
B, N, V, D, Hq, Hk, Dh, S = 2, 3, 11, 64, 2, 1, 32, 8
par = torch.tensor([[-1, 0, 0], [-1, 0, 1]], dtype=torch.int32)
draft = torch.randint(0, V, (B, N), dtype=torch.int32, generator=g)
logits = torch.randn(B, N + 1, V, generator=g)
seed, off = torch.tensor([1, 2]), torch.zeros(B, dtype=torch.int64)
h, w = torch.randn(B, D, generator=g), torch.randn(V, D, generator=g)
kc, vc = torch.zeros(B, Hk, S, Dh), torch.zeros(B, Hk, S, Dh)
lens = torch.tensor([2, 3], dtype=torch.int32)
q, kn = torch.randn(B, 1, Hq, Dh, generator=g), torch.randn(B, 1, Hk, Dh, generator=g)
cs = torch.randn(S, Dh, generator=g)
aw = AdapterWeights(torch.ones(D), torch.randn(Hq * Dh, D, generator=g), torch.randn(Hk * Dh, D, generator=g),
                    torch.randn(Hk * Dh, D, generator=g), torch.randn(D, Hq * Dh, generator=g), torch.ones(D), Hq, Hk)
calls = {
    "build_tree_ref": lambda: R.build_tree_ref(par),
    "verify_greedy_ref": lambda: R.verify_greedy_ref(draft, logits, parents=par),
    "verify_sample_ref": lambda: R.verify_sample_ref(draft, logits, parents=par, seed=seed, offset=off),
    "filtered_probs_ref": lambda: R.filtered_probs_ref(logits, 0.7, 5, 0.9),
    "philox_uniforms": lambda: R.philox_uniforms(seed, off, 4),
    "philox4x32_10": lambda: R.philox4x32_10((0, 1, 2, 3), (4, 5)),
    "sample_exp_ref": lambda: R.sample_exp_ref(torch.rand(5, generator=g)),
    "compact_kv_ref": lambda: R.compact_kv_ref(kc[None], vc[None], lens, torch.tensor([[1, -1, -1, -1]] * B,
                                                dtype=torch.int32), torch.ones(B, dtype=torch.int32)),
    "lm_head_exit_ref": lambda: R.lm_head_exit_ref(h, w, 0.5, temperature=0.8, seed=seed),
    "lm_head_topk_ref": lambda: R.lm_head_topk_ref(h, w, 3),
    "quantize_lm_head_ref": lambda: R.quantize_lm_head_ref(w),
    "lm_head_exit_int8_ref": lambda: R.lm_head_exit_int8_ref(h, R.quantize_lm_head_ref(w), 0.5),
    "lm_head_logits_ref": lambda: R.lm_head_logits_ref(h, w),
    "lm_head_uniforms_ref": lambda: R.lm_head_uniforms_ref(seed, off, V),
    "philox4x32_10_torch": lambda: R.philox4x32_10_torch(0, 1, 2, 3, 4, 5),
    "append_attention_ref": lambda: R.append_attention_ref(q, kn, kn, kc.clone(), vc.clone(), lens,
                                                           rope_cos_sin=cs),
    "apply_rope_ref": lambda: R.apply_rope_ref(q, lens[:, None], cs),
    "adapter_forward_ref": lambda: R.adapter_forward_ref(h, aw, kc.clone(), vc.clone(), lens, lens),
    "ngram_lookup_ref": lambda: R.ngram_lookup_ref(torch.tensor([[1, 2, 1, 2, 1], [3, 3, 3, 0, 0]]), lens + 1, 1, 2, 3),
    "merge_lookup_tree_ref": lambda: R.merge_lookup_tree_ref(draft, torch.tensor([[draft[0, 0].item(), 5], [-1, -1]])),
}
missing = sorted(set(R.__all__) - set(calls))
assert not missing, f"reference functions this test does not call: {missing}"
for name in R.__all__:
    calls[name]()
import kangaroo_kernels.rope as rope
rope.make_rope_cos_sin(S, Dh, scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 4})
mods = sorted(m for m in sys.modules if m.startswith(("kangaroo_kernels.ops", "kangaroo_kernels.triton",
                                                      "kangaroo_kernels._", "triton", "kangaroo.")))
ops = sorted(o for o in torch._C._dispatch_get_all_op_names() if o.startswith("kangaroo_kernels::"))
print(repr((mods, ops)))
"""


def _run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_reference_imports_no_op_module_and_registers_no_op():
    assert _run(_CALL_EVERY_REF) == repr(([], []))


def test_the_check_sees_an_op_import():
    """Control: the same probe reports an op module and its registered op when one is imported."""
    probe = _CALL_EVERY_REF.replace("import kangaroo_kernels.rope as rope",
                                    "import kangaroo_kernels.rope as rope\nimport kangaroo_kernels.ops.lm_head_exit")
    mods, ops = eval(_run(probe))
    assert "kangaroo_kernels.ops.lm_head_exit" in mods
    assert "kangaroo_kernels::lm_head_exit" in ops


def test_public_names_are_never_modules():
    """Importing every op module leaves each public name of kangaroo_kernels the function or type it names."""
    code = (
        "import importlib, pkgutil, types\n"
        "import kangaroo_kernels as kk, kangaroo_kernels.ops as ops\n"
        "for m in pkgutil.iter_modules(ops.__path__):\n"
        "    importlib.import_module('kangaroo_kernels.ops.' + m.name)\n"
        "bad = [n for n in kk.__all__ if isinstance(getattr(kk, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
        "assert type(kk) is types.ModuleType\n"
        "from kangaroo_kernels.ops import verify_greedy as mod\n"
        "assert kk.verify_greedy is mod.verify_greedy and callable(kk.verify_greedy)\n"
        "print('ok')\n"
    )
    assert _run(code) == "ok"
