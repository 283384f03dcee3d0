"""The host side of a generate call: GenerateOutput / GenerateStats, and the Tally that absorbs each cycle's packed
result (emitted tokens cut at EOS and max_new, streaming, statistics) and the Timer of the draft/verify split."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, List

import torch

__all__ = ["GenerateOutput", "GenerateStats", "Tally", "Timer"]


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
    draft_head: str = ""                # the chain's draft LM head: "exact" or "int8" (KangarooDecoder draft_head)
    mean_draft_steps: float = 0.0       # adapter + LM-head draft steps run per cycle (the cost side of drafting)
    accepted_from_chain: int = 0        # accepted draft nodes the adapter drafted (chain or siblings; shared too)
    accepted_from_lookup: int = 0       # accepted private lookup-branch nodes (lookup=True)
    lookup_hit_rate: float = 0.0        # share of row-cycles where the lookup found a match (lookup=True)


@dataclasses.dataclass
class GenerateOutput:
    tokens: Any  # 1-D LongTensor of the new tokens (batch-1 input) or a list of them (one per row)
    stats: GenerateStats


class Timer:
    """The draft/verify time split: CUDA events (read once at the end: no sync in the loop) or the host clock."""

    def __init__(self, device: torch.device):
        self.device, self.cuda, self.spans = device, device.type == "cuda", []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self) -> None:
        self.last = self._now()

    def run(self, kind: str, fn, *args):
        """fn(*args), timed from the previous mark (start or the previous run) as `kind`."""
        out = fn(*args)
        now = self._now()
        self.spans.append((kind, self.last, now))
        self.last = now
        return out

    def totals(self):
        """(draft seconds, verify seconds)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        total = {"draft": 0.0, "verify": 0.0}
        for kind, a, b in self.spans:
            total[kind] += a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return total["draft"], total["verify"]


class Tally:
    """Rows' outputs and statistics of one generate call (B rows, at most max_new tokens each, N draft nodes and
    at most γ = n_pos chain drafts a cycle)."""

    def __init__(self, B: int, max_new: int, n_nodes: int, n_pos: int, eos, streamer, stats: GenerateStats):
        self.outs: List[List[int]] = [[] for _ in range(B)]
        self.alive = [True] * B
        self.max_new, self.eos, self.streamer, self.stats = max_new, set(eos or ()), streamer, stats
        self.hist, self.drafted, self.accepted = [0] * (n_nodes + 1), [0] * n_pos, [0] * n_pos
        self.draft_steps = 0
        self.lookup_hits = 0

    def any_alive(self) -> bool:
        return any(self.alive)

    def absorb(self, res: List[List[int]], draft_steps: int) -> None:
        """res: rows [accept_len, n_chain, was_alive, accepted lookup nodes, lookup hit, tokens...] of a cycle
        (buf.out); draft_steps: the cycle's."""
        self.stats.cycles += 1
        self.draft_steps += draft_steps
        s = self.stats
        for b, (a, n_chain, was_alive, n_look, hit, *toks) in enumerate(res):
            if not was_alive:  # the device finished the row: never wait on it (no endless loop)
                self.alive[b] = False
            if not self.alive[b]:
                continue
            out = self.outs[b]
            new = toks[:a + 1][:self.max_new - len(out)]
            new = new[:next((j + 1 for j, t in enumerate(new) if t in self.eos), None)]
            out.extend(new)
            self.alive[b] = len(out) < self.max_new and not (new and new[-1] in self.eos)
            self.hist[a] += 1
            s.accepted_from_lookup += n_look
            s.accepted_from_chain += a - n_look
            self.lookup_hits += hit
            for i in range(n_chain):  # the adapter's accepted nodes are the path's leading ones
                self.drafted[i] += 1
                self.accepted[i] += i < a - n_look
            if self.streamer is not None and new:
                if hasattr(self.streamer, "put"):  # HF streamers (batch 1)
                    self.streamer.put(torch.tensor([new]))
                else:
                    self.streamer(b, list(new))

    def finish(self, timer: Timer, t_start: float) -> GenerateStats:
        s = self.stats
        if self.streamer is not None and hasattr(self.streamer, "end"):
            self.streamer.end()
        s.draft_time_s, s.verify_time_s = timer.totals()
        s.time_s = time.perf_counter() - t_start
        s.new_tokens = sum(len(o) for o in self.outs)
        s.tokens_per_s = s.new_tokens / max(s.time_s, 1e-9)
        s.mean_draft_steps = self.draft_steps / max(s.cycles, 1)
        rows = sum(self.hist)
        if rows:
            accepted = sum(i * n for i, n in enumerate(self.hist))
            s.mean_accepted, s.mean_tokens_per_cycle = accepted / rows, (accepted + rows) / rows
            s.mean_drafted = sum(self.drafted) / rows
            s.lookup_hit_rate = self.lookup_hits / rows
        s.accept_hist, s.drafted_per_position = self.hist, self.drafted
        s.accept_per_position = [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]
        return s

    def output(self, single: bool) -> GenerateOutput:
        tensors = [torch.tensor(o, dtype=torch.long) for o in self.outs]
        return GenerateOutput(tensors[0] if single else tensors, self.stats)
