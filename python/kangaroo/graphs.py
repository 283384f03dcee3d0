"""CUDA graphs for a decode call's steps: a warm-up with every row inactive, then one graph per step.

The steps are kangaroo.generate's draft loops (one per adaptive cap, picked each cycle by next_draft_cap) and verify,
closed over a DecodeState's static buffers; the warm-up also runs on CPU's predicated path so it is tested there.
"""

from __future__ import annotations

import torch

from kangaroo.state import DecodeState

__all__ = ["warm_up_inactive", "capture", "next_draft_cap"]


def warm_up_inactive(st: DecodeState, steps, rounds: int = 2) -> None:
    """Runs every step `rounds` times with every row inactive (loads and compiles every kernel before capture),
    then restores alive and the Philox offsets (verify_sample advances every row's). The decode state is unchanged;
    only per-cycle scratch and cache slots from L0 on are written (tests/test_decoder_sync.py checks this)."""
    b = st.buf
    alive, offset = b.alive.clone(), None if b.offset is None else b.offset.clone()
    b.alive.zero_()
    for _ in range(rounds):
        for f in steps:
            f()
    b.alive.copy_(alive)
    if offset is not None:
        b.offset.copy_(offset)


def capture(st: DecodeState, drafts, verify):
    """Warms the steps up on a side stream (warm_up_inactive), captures each in a CUDA graph (capture records
    the kernels without running them: the state is untouched) and returns their replays: ({cap: replay}, replay),
    shaped like the steps given."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up_inactive(st, [*drafts.values(), verify])
    torch.cuda.current_stream().wait_stream(side)

    def graph(f):
        # a private memory pool per graph: the draft graphs (one per cap) replay in any order, and graphs that
        # share a pool are only safe replayed in capture order; each holds only small per-step temporaries
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        return lambda *_: g.replay()

    return {cap: graph(f) for cap, f in drafts.items()}, graph(verify)


def next_draft_cap(cap: int, gamma: int, drafted: int) -> int:
    """The next cycle's draft-step cap from this cycle's: drafted = the most drafts any row made under `cap`.
    A row that used the whole cap may have been cut short, so the cap returns to γ; otherwise every row exited
    on its own confidence and the next cycle gets one step more than the longest draft."""
    return gamma if drafted >= cap else min(gamma, drafted + 1)
