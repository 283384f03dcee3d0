"""At most one device -> host transfer per Kangaroo cycle, counted.

A TorchDispatchMode counts every op that makes the host read tensor data (_local_scalar_dense: .item(), int(),
float(), bool(); is_nonzero, equal; data-dependent shapes: nonzero, masked_select, boolean-mask indexing;
device -> host copies) and Tensor.tolist / Tensor.numpy (which read CPU tensors without dispatching) are patched
to count too. The whole generate call runs under it (setup included); the count must be <= the number of cycles.
The ops' own CPU implementations run below the dispatch mode (the mode sees the custom op, not its insides), as
on CUDA where they are kernels. A planted extra read per draft step is caught.
"""

import warnings

import pytest
import torch
from draft_watch import watch_draft_steps
from kangaroo.generate import KangarooDecoder
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class CountHostReads(TorchDispatchMode):
    READS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten.masked_select,
             aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive}
    MASK_INDEX = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.what = []

    def _hit(self, what):
        self.count += 1
        self.what.append(what)

    def __enter__(self):
        self._saved = (torch.Tensor.tolist, torch.Tensor.numpy)
        tolist, numpy = self._saved
        mode = self

        def counted_tolist(t):
            mode._hit("tolist")
            return tolist(t)

        def counted_numpy(t, *a, **k):
            mode._hit("numpy")
            return numpy(t, *a, **k)

        torch.Tensor.tolist, torch.Tensor.numpy = counted_tolist, counted_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        p = func.overloadpacket
        if p in self.READS:
            self._hit(str(func))
        elif p in self.MASK_INDEX and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                          for i in (args[1] if len(args) > 1 and args[1] is not None else [])):
            self._hit(str(func))
        elif p in (aten._to_copy, aten.copy_):
            src = args[1] if p is aten.copy_ else args[0]
            dst_cpu = (args[0].device.type == "cpu" if p is aten.copy_
                       else kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu:
                self._hit(str(func))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def dec():
    import transformers as tf

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         initializer_range=0.15)
    hf = tf.Qwen2ForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield KangarooDecoder.from_pretrained(hf, exit_layer=2)
    torch.set_num_threads(n)


PROMPTS = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4]]


@pytest.mark.parametrize("kw", [dict(), dict(tree=True), dict(temperature=0.9, top_k=20, top_p=0.9, seed=3),
                                dict(tree=True, temperature=1.0, seed=4), dict(threshold=0.0, max_draft=6)],
                         ids=["greedy", "tree", "sample", "tree-sample", "gamma6"])
def test_one_transfer_per_cycle(dec, kw, monkeypatch):
    # the CUDA contract (predicated draft steps, one read per cycle); on CPU the decoder by default also reads the
    # exit flags to stop drafting early, which is free for CPU tensors (test_host_early_exit_is_exact below)
    monkeypatch.setattr(dec, "host_early_exit", False)
    with CountHostReads() as c:
        out = dec.generate(PROMPTS, 12, eos=[100], **kw)
    assert out.stats.cycles >= 3
    assert c.count <= out.stats.cycles, (c.count, out.stats.cycles, c.what[:10])
    assert c.count >= 1  # the counter sees the per-cycle read
    with CountHostReads() as c:
        out = dec.generate_autoregressive(PROMPTS[0], 8)
    assert c.count <= out.stats.cycles == 8


@pytest.mark.parametrize("kw", [dict(), dict(tree=True), dict(threshold=0.0, max_draft=6)],
                         ids=["greedy", "tree", "gamma6"])
def test_host_early_exit_is_exact(dec, kw, monkeypatch):
    """CPU early exit (stop drafting when no row drafts, verify only the drafted block) changes no token and
    really skips work: fewer shallow-layer calls than the predicated loop."""
    outs, calls = [], []
    for flag in (False, True):
        monkeypatch.setattr(dec, "host_early_exit", flag)
        n = [0]
        with monkeypatch.context() as mp:
            watch_draft_steps(mp, on_shallow=lambda: n.__setitem__(0, n[0] + 1))
            out = dec.generate(PROMPTS, 12, **kw)
        outs.append([t.tolist() for t in out.tokens])
        calls.append(n[0])
    assert outs[0] == outs[1]
    if kw.get("threshold", 0.6) > 0:
        assert calls[1] < calls[0], calls


def test_planted_read_is_counted(dec, monkeypatch):
    watch_draft_steps(monkeypatch, on_draft=lambda tok: float(tok.max()))  # a host read per draft step
    monkeypatch.setattr(dec, "host_early_exit", False)
    with CountHostReads() as c:
        out = dec.generate(PROMPTS, 12, max_draft=4)
    assert c.count > out.stats.cycles


# per-cycle scratch: written by every cycle before it is read, so the warm-up may leave anything there
_SCRATCH = {"drafts", "n_chain", "hbuf", "out", "cur", "acc", "side_k", "side_v"}


def _state(st):
    """Every state tensor (buffers, tree layout, RoPE table) but the scratch ones; of the shallow/deep KV cache
    [layers, B, Hk, S, Dh] the committed slots of each row (positions < L0: from L0 on, the slots belong to the
    next draft block, which rewrites them before anything reads them; tree verification parks sibling K/V there
    for every row)."""
    import dataclasses

    snap = {"rope": st.rope.clone()}
    parts = [("buf", st.buf)] + ([("tree", st.tree)] if st.tree is not None else [])
    for part, obj in parts:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name not in _SCRATCH and isinstance(v, torch.Tensor):
                snap[f"{part}.{f.name}"] = v.clone()
    assert "buf.L0" in snap and "buf.ak" in snap and "buf.alive" in snap
    for i, t in enumerate((st.buf.cache.k, st.buf.cache.v)):
        for b, n in enumerate(st.buf.L0.tolist()):
            snap[f"cache{i}[row {b}]"] = t[:, b, :, :n].clone()
    return snap


def _changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


@pytest.mark.parametrize("kw", [dict(), dict(tree=True), dict(temperature=0.9, top_k=20, seed=3),
                                dict(tree=True, temperature=1.0, seed=4)],
                         ids=["greedy", "tree", "sample", "tree-sample"])
def test_graph_warm_up_leaves_the_state_unchanged(dec, kw, monkeypatch):
    """The CUDA-graph path first runs every step with all rows inactive (kangaroo.graphs.warm_up_inactive);
    that must change no cache entry, length, token or sampling offset. Checked on CPU, where the same warm-up
    runs on the predicated path."""
    from kangaroo import graphs as kgraphs

    real = kgraphs.warm_up_inactive
    diffs = []

    def checked(st, steps, **k):
        before = _state(st)
        real(st, steps, **k)
        diffs.append(_changed(before, _state(st)))

    monkeypatch.setattr(kgraphs, "warm_up_inactive", checked)
    monkeypatch.setattr(dec, "host_early_exit", False)
    out = dec.generate(PROMPTS, 12, **kw)
    assert diffs == [[]], diffs
    assert all(len(t) == 12 for t in out.tokens)


def test_warm_up_check_catches_a_state_write(dec, monkeypatch):
    """Control: a commit that advances the lengths of inactive rows, planted during the warm-up only, is
    reported by the warm-up check."""
    from kangaroo import graphs as kgraphs
    from kangaroo import verify as kverify

    real_commit = kverify.commit

    def leaky_commit(st, *a, **k):
        st.buf.n_gen.add_(1)  # ignores the alive mask
        return real_commit(st, *a, **k)

    real = kgraphs.warm_up_inactive
    diffs = []

    def checked(st, steps, **k):
        before = _state(st)
        monkeypatch.setattr(kverify, "commit", leaky_commit)
        real(st, steps, **k)
        monkeypatch.setattr(kverify, "commit", real_commit)
        diffs.append(_changed(before, _state(st)))

    monkeypatch.setattr(kgraphs, "warm_up_inactive", checked)
    monkeypatch.setattr(dec, "host_early_exit", False)
    dec.generate(PROMPTS, 4)
    assert diffs == [["buf.n_gen"]], diffs


def test_next_draft_cap():
    from kangaroo.generate import next_draft_cap

    assert next_draft_cap(6, 6, 6) == 6  # a row used all 6: keep the full γ
    assert next_draft_cap(6, 6, 2) == 3  # the longest draft was 2: one step more next time
    assert next_draft_cap(3, 6, 0) == 1  # nobody drafted (every first draft fell below η): one step
    assert next_draft_cap(3, 6, 3) == 6  # cut short at the cap: back to γ
    assert next_draft_cap(1, 6, 1) == 6
    assert next_draft_cap(4, 4, 3) == 4
