"""KangarooDecoder: Kangaroo self-speculative decoding (arXiv 2404.18911) on a Llama-family checkpoint.

    dec = KangarooDecoder.from_pretrained("path/to/llama", adapter="path/to/adapter")
    out = dec.generate(prompt_ids, max_new_tokens=128)             # greedy, sequence mode
    out = dec.generate(prompts, 128, tree=True, temperature=0.7, seed=0)
    out = dec.generate(prompt_ids, 128, lookup=True)                # Kangaroo + lookup (kangaroo.lookup)
    out.tokens, out.stats.tokens_per_s, out.stats.mean_accepted

A cycle: draft (kangaroo.draft), verify + commit (kangaroo.verify) on static buffers (kangaroo.state), then one
host read of a packed int32 tensor that kangaroo.stats.Tally absorbs. On CUDA each side is a CUDA graph, replayed.
Adaptive draft cap (the predicated path, i.e. CUDA, cannot stop drafting on device flags without a sync): a draft
graph per cap γ' = 1..γ, γ' picked on the host from the previous cycle's drafts (next_draft_cap; output unchanged).
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import torch

from kangaroo import _args
from kangaroo import draft as _draft
from kangaroo import graphs as _graphs
from kangaroo import verify as _verify
from kangaroo.adapter import KangarooAdapter
from kangaroo.graphs import next_draft_cap
from kangaroo.model import LlamaModel
from kangaroo.state import DecodeSettings, DecodeState, cache_slots, draft_head_weight, new_state, prefill
from kangaroo.stats import GenerateOutput, GenerateStats, Tally, Timer

__all__ = ["KangarooDecoder", "GenerateOutput", "GenerateStats", "DecodeState", "next_draft_cap"]


class KangarooDecoder:
    """The base model (kangaroo.model.LlamaModel) plus its Kangaroo adapter. It keeps no decode state between
    calls; `debug_hook`, when set, is called with each call's final DecodeState (caches, lengths: tests).
    draft_lm_head: (the int8 draft head or None for the exact head, its description): what the chain drafts with."""

    def __init__(self, model: LlamaModel, adapter: KangarooAdapter, *, cuda_graphs: bool = True,
                 max_cache_len: Optional[int] = None, host_early_exit: Optional[bool] = None,
                 adaptive_draft: bool = True, draft_head: str = "auto"):
        """host_early_exit: stop drafting once no row drafts and verify only the drafted block, reading exit flags
        on the host. Default: on for CPU models (the read is free), off on CUDA (predicated steps in a CUDA graph).
        adaptive_draft: on the predicated path, cap a cycle's draft steps (next_draft_cap; a draft graph per cap).
        draft_head: the chain's draft LM head, "auto" (CPU: an int8 copy where it measures faster), "int8" (CPU)
        or "exact" (kangaroo.state.draft_head_weight); output is the same either way."""
        _args.check_draft_head(draft_head, model.device)
        adapter.check_base(model)
        self.model = model
        self.adapter = adapter.to(device=model.device, dtype=model.dtype).eval()
        self.exit_layer = adapter.exit_layer
        self.cuda_graphs, self.host_early_exit, self.adaptive_draft = cuda_graphs, host_early_exit, adaptive_draft
        self.max_cache_len, self.draft_head = max_cache_len, draft_head
        self.draft_lm_head = draft_head_weight(model, self.adapter, draft_head)  # (int8 copy | None, description)
        self.debug_hook: Optional[Callable[[DecodeState], None]] = None

    @classmethod
    def from_pretrained(cls, path_or_hf_model, adapter=None, exit_layer: Optional[int] = None, dtype=None,
                        device=None, **kwargs) -> "KangarooDecoder":
        """path_or_hf_model: a local HF checkpoint folder, a transformers Llama/Mistral/Qwen2 model or a
        LlamaModel. adapter: a KangarooAdapter, an adapter folder (save_pretrained), or None for a freshly
        initialised adapter at exit_layer (default 2; with a warning: it drafts poorly, output stays exact).
        An exit_layer that contradicts the given adapter's raises ValueError."""
        path_or_hf_model, adapter, exit_layer, dtype, device = _args.check_from_pretrained_args(
            path_or_hf_model, adapter, exit_layer, dtype, device)
        model = LlamaModel.from_pretrained(path_or_hf_model, dtype=dtype, device=device)
        adapter = KangarooAdapter.resolve(adapter, model, exit_layer)
        return cls(model, adapter, **kwargs)

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, threshold: float = 0.6, max_draft: int = 6,
                 tree: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Optional[int] = None, eos=None, streamer=None, *, tree_topk: int = 2,
                 sibling_threshold: float = 0.05, lookup: bool = False, lookup_max: int = 4,
                 lookup_ngram=(3, 4), lookup_policy: str = "auto") -> GenerateOutput:
        """Kangaroo decoding. threshold: the dynamic-exit confidence η; max_draft: γ; tree: top-`tree_topk`
        candidates per draft step (siblings kept when their draft probability >= sibling_threshold).
        temperature 0 is greedy (the output equals plain greedy decoding); > 0 samples losslessly from the
        target filtered by top_k / top_p, reproducibly for a given seed. eos: an id or ids that end a row (the EOS
        is included in its output). streamer: callable(row, new_token_ids) or an object with put/end (HF
        streamers; batch 1). lookup: Kangaroo + lookup (kangaroo.lookup), each cycle also verifies the up to
        `lookup_max` tokens that followed the latest earlier occurrence of the longest suffix of lookup_ngram =
        (n_min, n_max) tokens of the row's prompt + output (exact and lossless; defaults: the demo's fastest, CPU).
        lookup_policy: "merge" verifies the lookup merged with the adapter's chain every cycle; "first": a row whose
        lookup matched verifies it alone (no chain that cycle); "auto": "first" with the CPU early exit, else merge."""
        a = _args.check_generate_args(self.config, input_ids, max_new_tokens, threshold, max_draft, tree, temperature,
                                      top_k, top_p, seed, eos, streamer, tree_topk, sibling_threshold,
                                      self.max_cache_len)
        M, ngram = _args.check_lookup(lookup, lookup_max, lookup_ngram)
        policy = _args.check_lookup_policy(lookup_policy)
        return self._generate(input_ids, a.max_new_tokens, a.seed, a.eos, a.streamer, a.threshold, a.max_draft,
                              a.tree_topk if a.tree else 1, a.sibling_threshold, a.temperature, a.top_k, a.top_p,
                              lookup=(M, ngram, policy))

    @torch.no_grad()
    def generate_autoregressive(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                                top_p: float = 1.0, seed: Optional[int] = None, eos=None,
                                streamer=None) -> GenerateOutput:
        """The baseline: one full forward per token on the same model code, caches and sampler."""
        a = _args.check_generate_args(self.config, input_ids, max_new_tokens, 0.0, 1, False, temperature, top_k, top_p,
                                      seed, eos, streamer, 2, 1.0, self.max_cache_len, autoregressive=True)
        return self._generate(input_ids, a.max_new_tokens, a.seed, a.eos, a.streamer, 0.0, 1, 1, 1.0, a.temperature,
                              a.top_k, a.top_p, autoregressive=True)

    def _generate(self, input_ids, max_new, seed, eos, streamer, threshold, gamma, topk, sibling_threshold,
                  temperature, top_k, top_p, autoregressive=False, lookup=(0, (1, 3), "merge")) -> GenerateOutput:
        m, c = self.model, self.model.config
        prompts, single = _args.parse_ids(input_ids, c.vocab_size)
        eos = _args.eos_list(eos, c.vocab_size)
        host_exit = m.device.type == "cpu" if self.host_early_exit is None else bool(self.host_early_exit)
        first = bool(lookup[0]) and (lookup[2] == "first" or (lookup[2] == "auto" and host_exit))
        cfg = DecodeSettings(self.exit_layer, gamma, topk, float(threshold), float(sibling_threshold),
                             float(temperature), int(top_k), float(top_p), max_new, host_exit, autoregressive,
                             lookup[0], lookup[1], first)
        B, S = len(prompts), cache_slots(cfg, c.max_context, self.max_cache_len, max(len(p) for p in prompts))
        mode = ("autoregressive" if autoregressive else "kangaroo-tree" if topk > 1 else "kangaroo") + (
            "+lookup" if cfg.lookup_max else "")
        tally = Tally(B, max_new, cfg.n_nodes, 0 if autoregressive else gamma, eos, streamer, GenerateStats(mode))
        if max_new == 0:
            return tally.output(single)
        t_start = time.perf_counter()
        tally.stats.draft_head = "" if autoregressive or topk > 1 else self.draft_lm_head[1]
        st = new_state(m, None if autoregressive else self.adapter, cfg, B, S, seed, eos,
                       self.draft_lm_head[0] if tally.stats.draft_head else None)
        prefill(st, prompts)
        if m.device.type == "cuda":
            torch.cuda.synchronize(m.device)
        tally.stats.prefill_time_s = time.perf_counter() - t_start
        drafts, verify = self._steps(st, tally.stats)
        timer, cap = Timer(m.device), gamma
        while tally.any_alive():
            timer.start()
            ran = timer.run("draft", drafts[cap]) if drafts else None
            timer.run("verify", verify, ran)
            res = st.buf.out.tolist()  # the cycle's one device -> host transfer
            tally.absorb(res, (cap if ran is None else ran) if drafts else 0)
            if len(drafts) > 1:
                cap = next_draft_cap(cap, gamma, max(r[1] for r in res))
        if self.debug_hook is not None:
            self.debug_hook(st)
        tally.finish(timer, t_start)
        return tally.output(single)

    def _steps(self, st: DecodeState, stats: GenerateStats):
        """{cap: draft loop} (a cap per step count when predicated; {}: autoregressive), verify; graphs on CUDA."""
        cfg = st.cfg
        if cfg.autoregressive:
            drafts, verify = {}, functools.partial(_verify.autoregressive_step, st)
        else:
            caps = range(1, cfg.gamma + 1) if self.adaptive_draft and not cfg.host_exit else [cfg.gamma]
            drafts = {cap: functools.partial(_draft.draft, st, cap) for cap in caps}
            verify = functools.partial(_verify.verify, st)
        if self.cuda_graphs and st.model.device.type == "cuda":
            stats.cuda_graphs = True
            return _graphs.capture(st, drafts, verify)
        if not cfg.host_exit:
            _graphs.warm_up_inactive(st, [*drafts.values(), verify])  # the graph path's warm-up, tested here too
        return drafts, verify
