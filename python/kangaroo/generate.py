"""KangarooDecoder: Kangaroo self-speculative decoding (arXiv 2404.18911) on a Llama-family checkpoint.

    dec = KangarooDecoder.from_pretrained("path/to/llama", adapter="path/to/adapter")
    out = dec.generate(prompt_ids, max_new_tokens=128)             # greedy, sequence mode
    out = dec.generate(prompts, 128, tree=True, temperature=0.7, seed=0)
    out.tokens, out.stats.tokens_per_s, out.stats.mean_accepted

One cycle = catch-up + draft loop (kangaroo.draft) and verify + commit (kangaroo.verify), all on static buffers
(DecodeState) with fixed shapes and predicated rows; the host reads one packed int32 tensor per cycle (the emitted
tokens) to stream them and decide when to stop. On CUDA the draft side and the verify side are each captured once
per generate call in a CUDA graph and replayed.

Adaptive draft cap (predicated path, i.e. CUDA): the draft loop cannot stop on the device's exit flags without a
host sync, so a cycle pays for every step it was built with even after every row exited. The decoder therefore
builds (captures) the draft loop for each cap γ' = 1..γ and picks γ' on the host from the previous cycle's drafts,
which the per-cycle transfer already carries (next_draft_cap). A cap only shortens drafts: output is unchanged.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, List, Optional, Sequence

import torch

from kangaroo import _args
from kangaroo import draft as _draft
from kangaroo import verify as _verify
from kangaroo.adapter import KangarooAdapter
from kangaroo.model import LlamaModel

__all__ = ["KangarooDecoder", "GenerateOutput", "GenerateStats", "DecodeState"]


@dataclasses.dataclass
class GenerateStats:
    mode: str = "kangaroo"
    new_tokens: int = 0
    time_s: float = 0.0
    tokens_per_s: float = 0.0
    cycles: int = 0
    mean_accepted: float = 0.0          # accepted draft tokens per row-cycle
    mean_tokens_per_cycle: float = 0.0  # committed tokens per row-cycle (accepted + 1)
    mean_drafted: float = 0.0           # chain drafts per row-cycle (dynamic exit)
    accept_per_position: List[float] = dataclasses.field(default_factory=list)  # P(accepted | drafted) at depth i
    drafted_per_position: List[int] = dataclasses.field(default_factory=list)  # row-cycles that drafted depth i
    accept_hist: List[int] = dataclasses.field(default_factory=list)  # row-cycles that accepted exactly i nodes
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    cuda_graphs: bool = False
    mean_draft_steps: float = 0.0       # adapter + LM-head draft steps run per cycle (the cost side of drafting)


@dataclasses.dataclass
class GenerateOutput:
    tokens: Any  # 1-D LongTensor of the new tokens (batch-1 input) or a list of them (one per row)
    stats: GenerateStats


class DecodeState:
    """Static device buffers and settings of one generate call (see kangaroo.draft / kangaroo.verify)."""

    def __init__(self, model: LlamaModel, adapter: Optional[KangarooAdapter], B: int, S: int, *, exit_layer: int,
                 gamma: int, tree: bool, topk: int, threshold: float, sibling_threshold: float, temperature: float,
                 top_k: int, top_p: float, seeds: Optional[torch.Tensor], eos: Optional[Sequence[int]],
                 max_new: int, autoregressive: bool = False):
        from kangaroo_kernels.types import Accepted

        c = model.config
        dev, dt = model.device, model.dtype
        self.model, self.B, self.S = model, B, S
        self.exit_layer, self.gamma, self.tree, self.topk = exit_layer, gamma, tree, topk
        self.threshold, self.sibling_threshold = float(threshold), float(sibling_threshold)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.cache = model.new_cache(B, S)
        self.rope = model.rope_cos_sin(S)
        D, Hk, Dh = c.hidden_size, c.num_key_value_heads, c.head_dim
        if autoregressive:
            N = 0
        elif tree:
            N = gamma * topk
        else:
            N = gamma
        self.n_nodes = N
        if adapter is not None and not autoregressive:
            self.adapter_weights = adapter.weights()
            self.adapter_eps = adapter.rms_norm_eps
            self.ak = torch.zeros(B, adapter.num_kv_heads, S, adapter.head_dim, dtype=dt, device=dev)
            self.av = torch.zeros_like(self.ak)
        i32 = dict(dtype=torch.int32, device=dev)
        self.tok = torch.zeros(B, **i32)
        self.cur = torch.zeros(B, **i32)
        self.L0 = torch.zeros(B, **i32)
        self.n_gen = torch.zeros(B, **i32)
        self.n_chain = torch.zeros(B, **i32)
        self.host_exit = False  # set by KangarooDecoder: stop drafting on the host when no row drafts (CPU)
        self.max_new = torch.full((B,), max_new, **i32)
        self.alive = torch.ones(B, dtype=torch.bool, device=dev)
        self.need_catch = torch.zeros(B, dtype=torch.bool, device=dev)
        self.catch_h = torch.zeros(B, D, dtype=dt, device=dev)
        self.drafts = torch.full((B, N), -1, **i32)
        self.hbuf = torch.zeros(B, gamma + 1, D, dtype=dt, device=dev)
        self.acc = Accepted(torch.zeros(B, **i32), torch.zeros(B, N + 1, **i32), torch.zeros(B, N + 1, **i32))
        self.out = torch.zeros(B, 3 + N + 1, **i32)
        self.arange_block = torch.arange(N + 1, **i32)
        self.eos = torch.tensor(sorted(set(eos)), **i32) if eos else None
        if temperature > 0:
            self.seed = seeds.to(dev)
            self.offset = torch.zeros(B, dtype=torch.int64, device=dev)
        if tree and not autoregressive:
            from kangaroo_kernels.ops.tree import build_tree

            K = topk
            ns = N - gamma
            parents = list(range(-1, gamma - 1))
            depth = list(range(1, gamma + 1))
            for i in range(gamma):
                for _ in range(K - 1):
                    parents.append(i - 1)
                    depth.append(i + 1)
            self.tree_parents = torch.tensor(parents, **i32)[None].expand(B, N).contiguous()
            full = torch.tensor([-1] + [p + 1 for p in parents], **i32)[None].expand(B, N + 1).contiguous()
            self.tree_mask = build_tree(full, validate=False).mask
            self.tree_depth_full = torch.tensor([0] + depth, **i32)
            self.diag_mask = (1 << torch.arange(K, **i32))[None, :, None].expand(B, K, 1).contiguous()
            self.sib_h = torch.zeros(B, ns, D, dtype=dt, device=dev)
            self.side_k = torch.zeros(exit_layer, B, Hk, ns, Dh, dtype=dt, device=dev)
            self.side_v = torch.zeros_like(self.side_k)


def _parse_ids(input_ids, V: int):
    """-> (list of prompts as lists of ints, single: bool). Raises ValueError on empty prompts / bad ids."""
    return _args.parse_ids(input_ids, V)


def _eos_list(eos, V: Optional[int] = None) -> Optional[List[int]]:
    """None, an id or ids -> a list of ints in [0, V) (V None: the range is checked by generate's checks)."""
    return _args.eos_list(eos, 2 ** 63 if V is None else V)


class KangarooDecoder:
    """The base model (kangaroo.model.LlamaModel) plus its Kangaroo adapter."""

    def __init__(self, model: LlamaModel, adapter: KangarooAdapter, *, cuda_graphs: bool = True,
                 max_cache_len: Optional[int] = None, host_early_exit: Optional[bool] = None,
                 adaptive_draft: bool = True):
        """host_early_exit: stop the draft loop as soon as no row drafts and verify only the drafted block,
        reading the (CPU) exit flags on the host. Default: on for CPU models, where that read is free; off on
        CUDA, where the draft steps are predicated inside a CUDA graph (no host sync in the cycle).
        adaptive_draft: on the predicated path, cap each cycle's draft steps from the previous cycle's drafts
        (next_draft_cap; one captured draft graph per cap)."""
        adapter.check_base(model)
        self.model = model
        self.adapter = adapter.to(device=model.device, dtype=model.dtype).eval()
        self.exit_layer = adapter.exit_layer
        self.cuda_graphs = cuda_graphs
        self.host_early_exit = host_early_exit
        self.adaptive_draft = adaptive_draft
        self.max_cache_len = max_cache_len
        self.last_state: Optional[DecodeState] = None

    @classmethod
    def from_pretrained(cls, path_or_hf_model, adapter=None, exit_layer: int = 2, dtype=None, device=None,
                        **kwargs) -> "KangarooDecoder":
        """path_or_hf_model: a local HF checkpoint folder, a transformers Llama/Mistral/Qwen2 model or a
        LlamaModel. adapter: a KangarooAdapter, an adapter folder (save_pretrained), or None for a freshly
        initialised adapter at exit_layer (with a warning: it drafts poorly, output stays exact)."""
        _, _, _, dtype, device = _args.check_from_pretrained_args(path_or_hf_model, adapter, exit_layer, dtype, device)
        model = LlamaModel.from_pretrained(path_or_hf_model, dtype=dtype, device=device)
        L = model.config.num_hidden_layers
        if isinstance(adapter, KangarooAdapter):
            ad = adapter
        elif isinstance(adapter, torch.nn.Module):
            raise ValueError(f"adapter must be None, a KangarooAdapter or an adapter folder, got "
                             f"{type(adapter).__name__}")
        elif adapter is not None:
            ad = KangarooAdapter.from_pretrained(adapter, base_model=model, map_location=model.device)
        else:
            if not isinstance(exit_layer, int) or not 1 <= exit_layer < L:
                raise ValueError(f"exit_layer must be an int in [1, {L - 1}] for this {L}-layer model, "
                                 f"got {exit_layer!r}")
            warnings.warn("KangarooDecoder: no adapter given, using a freshly initialised (untrained) adapter: "
                          "output is exact but acceptance will be low. Train one with `kangaroo train`.",
                          stacklevel=2)
            ad = KangarooAdapter.for_model(model, exit_layer)
        if ad is not None and exit_layer != 2 and exit_layer != ad.exit_layer:
            raise ValueError(f"exit_layer={exit_layer} contradicts the adapter's exit layer {ad.exit_layer}")
        return cls(model, ad, **kwargs)

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, threshold: float = 0.6, max_draft: int = 6,
                 tree: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Optional[int] = None, eos=None, streamer=None, *, tree_topk: int = 2,
                 sibling_threshold: float = 0.05) -> GenerateOutput:
        """Kangaroo decoding. threshold: the dynamic-exit confidence η; max_draft: γ; tree: top-`tree_topk`
        candidates per draft step (siblings kept when their draft probability >= sibling_threshold).
        temperature 0 is greedy (the output equals plain greedy decoding); > 0 samples losslessly from the
        target filtered by top_k / top_p, reproducibly for a given seed. eos: an id or ids that end a row (the EOS
        is included in its output). streamer: callable(row, new_token_ids) or an object with put/end (HF
        streamers; batch 1)."""
        a = _args.check_generate_args(self.config, input_ids, max_new_tokens, threshold, max_draft, tree,
                                      temperature, top_k, top_p, seed, eos, streamer, tree_topk, sibling_threshold,
                                      self.max_cache_len)
        return self._generate(input_ids, a.max_new_tokens, threshold=a.threshold, gamma=a.max_draft, tree=a.tree,
                              temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, eos=a.eos,
                              streamer=a.streamer, topk=a.tree_topk, sibling_threshold=a.sibling_threshold,
                              autoregressive=False)

    @torch.no_grad()
    def generate_autoregressive(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                                top_p: float = 1.0, seed: Optional[int] = None, eos=None,
                                streamer=None) -> GenerateOutput:
        """The baseline: one full forward per token on the same model code, caches and sampler."""
        a = _args.check_generate_args(self.config, input_ids, max_new_tokens, 0.0, 1, False, temperature, top_k,
                                      top_p, seed, eos, streamer, 2, 1.0, self.max_cache_len, autoregressive=True)
        return self._generate(input_ids, a.max_new_tokens, threshold=0.0, gamma=1, tree=False,
                              temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, eos=a.eos,
                              streamer=a.streamer, topk=2, sibling_threshold=1.0, autoregressive=True)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_settings(max_new_tokens, threshold, max_draft, temperature, top_k, top_p):
        return _args.check_settings(max_new_tokens, threshold, max_draft, temperature, top_k, top_p)

    def _generate(self, input_ids, max_new, *, threshold, gamma, tree, temperature, top_k, top_p, seed, eos,
                  streamer, topk, sibling_threshold, autoregressive) -> GenerateOutput:
        m = self.model
        c = m.config
        prompts, single = _parse_ids(input_ids, c.vocab_size)
        eos_ids = _eos_list(eos, c.vocab_size)
        B = len(prompts)
        lens = [len(p) for p in prompts]
        longest = max(lens) + max_new
        if longest > c.max_context:
            raise ValueError(f"request too long: prompt ({max(lens)} tokens) + max_new_tokens ({max_new}) = "
                             f"{longest} exceeds the model's context of {c.max_context} tokens")
        N = 0 if autoregressive else (gamma * topk if tree else gamma)
        S = max(lens) + max_new + N + 1
        if self.max_cache_len is not None and S > self.max_cache_len:
            raise ValueError(f"request too long for the cache: it needs {S} slots (prompt {max(lens)} + "
                             f"max_new_tokens {max_new} + {N + 1} for the draft block), max_cache_len is "
                             f"{self.max_cache_len}")
        mode = "autoregressive" if autoregressive else ("kangaroo-tree" if tree else "kangaroo")
        stats = GenerateStats(mode=mode)
        outs: List[List[int]] = [[] for _ in range(B)]
        if max_new == 0:
            return self._output(outs, single, stats)
        seeds = None
        if temperature > 0:
            if seed is None:
                base = int(torch.randint(0, 2 ** 62, (1,)).item())
            else:
                base = int(seed)
            seeds = torch.tensor([(base * 1000003 + 7919 * b + 1) % (2 ** 63) for b in range(B)], dtype=torch.int64)
        t_start = time.perf_counter()
        st = DecodeState(m, None if autoregressive else self.adapter, B, S, exit_layer=self.exit_layer,
                         gamma=gamma, tree=tree, topk=topk, threshold=threshold,
                         sibling_threshold=sibling_threshold, temperature=temperature, top_k=top_k, top_p=top_p,
                         seeds=seeds, eos=eos_ids, max_new=max_new, autoregressive=autoregressive)
        st.host_exit = (m.device.type == "cpu") if self.host_early_exit is None else bool(self.host_early_exit)
        self._prefill(st, prompts, autoregressive)
        if m.device.type == "cuda":
            torch.cuda.synchronize(m.device)
        stats.prefill_time_s = time.perf_counter() - t_start

        caps = [gamma]
        if autoregressive:
            steps = [lambda: _verify.autoregressive_step(st)]
        else:
            def draft_step(cap):
                def draft_fn():
                    _draft.catch_up(st)
                    return (_draft.draft_tree if tree else _draft.draft_chain)(st, steps=cap)
                return draft_fn

            if self.adaptive_draft and not st.host_exit:
                caps = list(range(1, gamma + 1))
            verify = _verify.verify_tree if tree else _verify.verify_chain
            steps = [draft_step(c) for c in caps] + [lambda: verify(st)]
        if self.cuda_graphs and m.device.type == "cuda":
            steps = _capture(st, steps)
            stats.cuda_graphs = True
        elif not st.host_exit:
            _warm_up_inactive(st, steps)  # the graph path's warm-up, also run (and tested) without graphs
        self._loop(st, steps, caps, outs, max_new, eos_ids, streamer, stats, single)
        self.last_state = st  # the final caches and lengths (debugging, cache-consistency tests)
        stats.time_s = time.perf_counter() - t_start
        stats.new_tokens = sum(len(o) for o in outs)
        stats.tokens_per_s = stats.new_tokens / max(stats.time_s, 1e-9)
        return self._output(outs, single, stats)

    def _prefill(self, st: DecodeState, prompts: List[List[int]], autoregressive: bool) -> None:
        """All layers (and the adapter) over every prompt but its last token, right-padded; the last token is
        each row's pending x0."""
        m = self.model
        dev = m.device
        B = len(prompts)
        lens = [len(p) for p in prompts]
        Tp = max(lens) - 1
        st.tok.copy_(torch.tensor([p[-1] for p in prompts], dtype=torch.int32))
        st.L0.copy_(torch.tensor([n - 1 for n in lens], dtype=torch.int32))
        if Tp == 0:
            return
        ids = torch.tensor([p[:-1] + [0] * (Tp - len(p) + 1) for p in prompts], dtype=torch.int32, device=dev)
        zeros = torch.zeros(B, dtype=torch.int32, device=dev)
        pos = torch.arange(Tp, device=dev)[None].expand(B, Tp)
        ell = self.exit_layer
        L = m.config.num_hidden_layers
        # chunked so a long prompt's attention block stays modest
        chunk = 512
        for s in range(0, Tp, chunk):
            e = min(Tp, s + chunk)
            x = m.embed(ids[:, s:e])
            start = zeros + s
            x = m.forward_layers(x, 0, ell, st.cache, start, pos[:, s:e])
            if not autoregressive:
                self.adapter.prefill(x, st.ak, st.av, start, pos[:, s:e], st.rope)
            m.forward_layers(x, ell, L, st.cache, start, pos[:, s:e])

    def _loop(self, st, steps, caps, outs, max_new, eos_ids, streamer, stats, single) -> None:
        """steps: [verify] (autoregressive) or one draft step per cap in caps, then verify."""
        B = st.B
        N = st.n_nodes
        eos_set = set(eos_ids or ())
        alive = [True] * B
        cuda = self.model.device.type == "cuda"
        hist = [0] * (N + 1)
        pos_drafted = [0] * max(N, 1)
        pos_accepted = [0] * max(N, 1)
        row_cycles = acc_sum = drafted_sum = 0
        events = []
        t_draft = t_verify = 0.0
        cap = caps[-1]
        draft_steps = 0
        while any(alive):
            cycle = [steps[-1]] if len(steps) == 1 else [steps[caps.index(cap)], steps[-1]]
            if cuda:
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(cycle) + 1)]
                ev[0].record()
                for f, e in zip(cycle, ev[1:]):
                    f()
                    e.record()
                events.append(ev)
                draft_steps += cap if len(cycle) == 2 else 0
            else:
                t0 = time.perf_counter()
                ran = cycle[0]()
                t1 = time.perf_counter()
                for f in cycle[1:]:
                    f()
                t2 = time.perf_counter()
                if len(cycle) == 1:
                    t_verify += t1 - t0
                else:
                    t_draft += t1 - t0
                    t_verify += t2 - t1
                    draft_steps += ran
            res = st.out.tolist()  # the cycle's one device -> host transfer
            stats.cycles += 1
            if len(caps) > 1:
                cap = next_draft_cap(cap, caps[-1], max(r[1] for r in res))
            for b in range(B):
                a, n_chain, was_alive = res[b][0], res[b][1], res[b][2]
                if not was_alive:  # the device finished the row: never wait on it (no endless loop)
                    alive[b] = False
                if not alive[b]:
                    continue
                new = res[b][3:3 + a + 1][:max_new - len(outs[b])]
                done = False
                for j, t in enumerate(new):
                    if t in eos_set:
                        new = new[:j + 1]
                        done = True
                        break
                outs[b].extend(new)
                if len(outs[b]) >= max_new:
                    done = True
                alive[b] = not done
                row_cycles += 1
                acc_sum += a
                drafted_sum += n_chain
                hist[a] += 1
                for i in range(min(n_chain, N)):
                    pos_drafted[i] += 1
                    if i < a:
                        pos_accepted[i] += 1
                if streamer is not None and new:
                    _stream(streamer, b, new)
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        if cuda:
            torch.cuda.synchronize(self.model.device)
            for ev in events:
                if len(steps) == 1:
                    t_verify += ev[0].elapsed_time(ev[1]) / 1e3
                else:
                    t_draft += ev[0].elapsed_time(ev[1]) / 1e3
                    t_verify += ev[1].elapsed_time(ev[2]) / 1e3
        stats.draft_time_s, stats.verify_time_s = t_draft, t_verify
        stats.mean_draft_steps = draft_steps / max(stats.cycles, 1)
        if row_cycles:
            stats.mean_accepted = acc_sum / row_cycles
            stats.mean_tokens_per_cycle = (acc_sum + row_cycles) / row_cycles
            stats.mean_drafted = drafted_sum / row_cycles
        stats.accept_hist = hist
        if N:
            stats.drafted_per_position = list(pos_drafted[:N if not st.tree else st.gamma])
            stats.accept_per_position = [pos_accepted[i] / pos_drafted[i] if pos_drafted[i] else 0.0
                                         for i in range(N if not st.tree else st.gamma)]

    @staticmethod
    def _output(outs, single, stats) -> GenerateOutput:
        tensors = [torch.tensor(o, dtype=torch.long) for o in outs]
        return GenerateOutput(tensors[0] if single else tensors, stats)


def next_draft_cap(cap: int, gamma: int, drafted: int) -> int:
    """The next cycle's draft-step cap from this cycle's: drafted = the most drafts any row made under `cap`.
    A row that used the whole cap may have been cut short, so the cap returns to γ; otherwise every row exited
    on its own confidence and the next cycle gets one step more than the longest draft."""
    if drafted >= cap:
        return gamma
    return min(gamma, drafted + 1)


def _stream(streamer, row: int, new: List[int]) -> None:
    if hasattr(streamer, "put"):
        streamer.put(torch.tensor([new]))
    else:
        streamer(row, list(new))


def _warm_up_inactive(st: DecodeState, steps, rounds: int = 2) -> None:
    """Runs every step `rounds` times with every row inactive, then restores the rows' alive flags and sampling
    offsets: loads and compiles every kernel (Triton JIT, cuBLAS handles) before a CUDA graph is captured.
    Inactive rows are no-ops for every op but verify_sample, which advances every row's Philox offset (hence the
    restore; a finished row never draws again), so the decode state (committed cache entries, lengths, tokens,
    offsets) is unchanged; only per-cycle scratch is written: buffers and the cache slots from L0 on, which the
    next draft block rewrites before anything reads them (tests/test_decoder_sync.py checks this on CPU)."""
    alive = st.alive.clone()
    offset = st.offset.clone() if st.temperature > 0 else None
    st.alive.zero_()
    for _ in range(rounds):
        for f in steps:
            f()
    st.alive.copy_(alive)
    if offset is not None:
        st.offset.copy_(offset)


def _capture(st: DecodeState, steps):
    """Warms the steps up on a side stream (_warm_up_inactive), captures each in a CUDA graph (capture records
    the kernels without running them: the state is untouched) and returns their replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _warm_up_inactive(st, steps)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for f in steps:
        # a private memory pool per graph: the draft graphs (one per cap) replay in any order, and graphs that
        # share a pool are only safe replayed in capture order; each holds only small per-step temporaries
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        graphs.append(g)
    return [g.replay for g in graphs]
