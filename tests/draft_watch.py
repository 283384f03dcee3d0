"""Test helper: observe every draft step the decoder runs, through either of its two paths.

The CPU chain on the int8 head runs its whole draft side as one native call (kangaroo_kernels::draft_chain, via
kangaroo.draft.native_ops: its steps are reported after it returns, from the passes it ran and the drafts it
wrote); every other configuration runs the step's ops (kangaroo.draft._shallow, draft_head).
Tests that count or instrument steps watch both, so they hold whichever path the decoder takes.
"""

import types

from kangaroo import draft as kdraft


def watch_draft_steps(monkeypatch, on_shallow=None, on_draft=None):
    """on_shallow() at every shallow pass of the draft loop; on_draft(token) at every adapter + head step that ran
    (token: the step's draft tokens [B] i32; the fused chain reports only steps where some row was drafting)."""
    real_shallow, real_head, native = kdraft._shallow, kdraft.draft_head, kdraft.native_ops()

    def shallow(*a, **k):
        if on_shallow:
            on_shallow()
        return real_shallow(*a, **k)

    def head(*a, **k):
        tok, keep, sib = real_head(*a, **k)
        if on_draft:
            on_draft(tok)
        return tok, keep, sib

    def chain(*a):  # the steps ran inside the call: report them from its result and the drafts it wrote
        passes = native.draft_chain(*a)
        drafts, n_steps = a[-6], a[-2]  # ..., drafts, n_chain, hit, catch_up, n_steps, host_exit
        for i in range(passes):
            if on_shallow:
                on_shallow()
            if on_draft and i < n_steps and bool((drafts[:, i] >= 0).any()):
                on_draft(drafts[:, i])
        return passes

    monkeypatch.setattr(kdraft, "_shallow", shallow)
    monkeypatch.setattr(kdraft, "draft_head", head)
    monkeypatch.setattr(kdraft, "native_ops", lambda: types.SimpleNamespace(draft_chain=chain))
