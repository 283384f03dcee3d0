"""Argument checking and normalisation for KangarooDecoder.generate / generate_autoregressive / from_pretrained.

Pure functions on host values (the prompt ids are read on the host anyway, to build the prefill): each bad argument
raises a ValueError that names it, before any decode state is allocated. The normalised values are plain Python
types (ints, floats, lists), so numpy scalars and 0-d tensors are accepted wherever an int or a float is.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, List, NamedTuple, Optional, Tuple

import torch

from kangaroo_kernels._checks import inv_temperature_finite

__all__ = ["GenerateArgs", "check_generate_args", "check_settings", "parse_ids", "eos_list", "check_streamer",
           "check_from_pretrained_args", "MAX_TREE_TOPK"]

MAX_TREE_TOPK = 16  # lm_head_topk's k


class GenerateArgs(NamedTuple):
    prompts: List[List[int]]
    single: bool
    max_new_tokens: int
    threshold: float
    max_draft: int
    tree: bool
    temperature: float
    top_k: int
    top_p: float
    seed: Optional[int]
    eos: Optional[List[int]]
    streamer: Any
    tree_topk: int
    sibling_threshold: float
    cache_len: int  # S: the static cache length the request needs (prompt + new tokens + draft block + 1)


def _is_int(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and not _is_np_bool(v)


def _is_np_bool(v) -> bool:
    return type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool")


def _int(name: str, v, lo: Optional[int] = None, hi: Optional[int] = None, what: str = "") -> int:
    if not _is_int(v):
        raise ValueError(f"{name} must be an int{what}, got {type(v).__name__} {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        lo_s = "" if lo is None else f"{lo} <= "
        hi_s = "" if hi is None else f" <= {hi}"
        raise ValueError(f"{name} must be an int with {lo_s}{name}{hi_s}{what}, got {v}")
    return v


def _real(name: str, v, what: str) -> float:
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype != torch.bool and not v.is_complex():
        v = v.item()
    if isinstance(v, bool) or _is_np_bool(v) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number {what}, got {type(v).__name__} {v!r}")
    return float(v)


def check_settings(max_new_tokens, threshold, max_draft, temperature, top_k, top_p) -> Tuple[int, float, int, float,
                                                                                                int, float]:
    """The sampling and drafting scalars -> (max_new_tokens, threshold, max_draft, temperature, top_k, top_p)."""
    max_new_tokens = _int("max_new_tokens", max_new_tokens, 0, what=" >= 0")
    threshold = _real("threshold", threshold, "in [0, 1]")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    max_draft = _int("max_draft", max_draft, 1, what=" >= 1")
    temperature = _real("temperature", temperature, "(a finite number >= 0; 0: greedy)")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature > 0:
        # the one rule of the op library (lm_head_exit, verify_sample): fl32(1 / T) must be finite
        if not inv_temperature_finite(temperature):
            raise ValueError(f"temperature {temperature!r} is too small: 1 / T overflows float32")
    top_k = _int("top_k", top_k, 0, what=" >= 0 (0: off)")
    top_p = _real("top_p", top_p, "in (0, 1]")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return max_new_tokens, threshold, max_draft, temperature, top_k, top_p


def parse_ids(input_ids, V: int) -> Tuple[List[List[int]], bool]:
    """-> (list of prompts as lists of ints, single: bool). Raises ValueError on empty prompts / bad ids."""
    single = False
    if isinstance(input_ids, torch.Tensor):
        if input_ids.device.type == "meta":
            raise ValueError("input_ids is on the meta device (it has no values): give real token ids")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            prompts, single = [input_ids.tolist()], True
        elif input_ids.dim() == 2:
            prompts = input_ids.tolist()
        else:
            raise ValueError(f"input_ids must be 1-D (one prompt) or 2-D [B, T], got shape {tuple(input_ids.shape)}")
    elif isinstance(input_ids, (list, tuple)):
        if len(input_ids) == 0:
            raise ValueError("input_ids is empty: give at least one prompt token")
        scalar = (lambda x: isinstance(x, numbers.Number) or (isinstance(x, torch.Tensor) and x.dim() == 0))
        if all(scalar(x) for x in input_ids):
            prompts, single = [list(input_ids)], True
        else:
            if not all(isinstance(p, (list, tuple, torch.Tensor)) for p in input_ids):
                raise ValueError("input_ids must be a list of token ids (one prompt) or a list of prompts")
            for b, p in enumerate(input_ids):
                if isinstance(p, torch.Tensor) and (p.dim() != 1 or p.device.type == "meta"):
                    raise ValueError(f"input_ids: prompt {b} must be a 1-D tensor with values, got shape "
                                     f"{tuple(p.shape)} on {p.device}")
            prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in input_ids]
    else:
        raise ValueError(f"input_ids must be a tensor or a list of token ids, got {type(input_ids).__name__}")
    if not prompts:
        raise ValueError("input_ids holds no prompt")
    out = []
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"input_ids: prompt {b} is empty: every prompt needs at least one token")
        if all(type(t) is int for t in p) and 0 <= min(p) and max(p) < V:  # the common case (tolist()), fast
            out.append(list(p))
            continue
        row = []
        for t in p:
            if not _is_int(t):
                raise ValueError(f"input_ids: prompt {b} holds a non-integer token {t!r}")
            t = int(t)
            if not 0 <= t < V:
                raise ValueError(f"input_ids: prompt {b} holds token id {t} outside the vocabulary [0, {V})")
            row.append(t)
        out.append(row)
    return out, single


def eos_list(eos, V: int) -> Optional[List[int]]:
    """None, an id, or a sequence / 1-D tensor of ids, each in [0, V) -> a list of ints (None: no EOS)."""
    if eos is None:
        return None
    if isinstance(eos, torch.Tensor):
        if eos.device.type == "meta" or eos.dim() > 1:
            raise ValueError(f"eos must be an id or a 1-D list of ids, got a tensor of shape {tuple(eos.shape)} "
                             f"on {eos.device}")
        eos = eos.tolist()
    ids = [eos] if not isinstance(eos, (list, tuple, set, frozenset)) else list(eos)
    out = []
    for e in ids:
        if not _is_int(e):
            raise ValueError(f"eos must be an id or a list of ids (ints), got {type(e).__name__} {e!r}")
        e = int(e)
        if not 0 <= e < V:
            raise ValueError(f"eos id {e} is outside the vocabulary [0, {V})")
        out.append(e)
    return out or None


def check_streamer(streamer, B: int):
    """None, a callable(row, new_token_ids), or an object with a callable put (and end, if it has one: HF
    streamers, which take one sequence: batch 1 only)."""
    if streamer is None:
        return None
    put = getattr(streamer, "put", None)
    if put is not None:
        if not callable(put):
            raise ValueError(f"streamer.put must be callable, got {type(put).__name__}")
        end = getattr(streamer, "end", None)
        if end is not None and not callable(end):
            raise ValueError(f"streamer.end must be callable, got {type(end).__name__}")
        if B != 1:
            raise ValueError(f"a streamer with put/end (HF streamers) takes one sequence, but input_ids holds "
                             f"{B} prompts: pass a callable(row, new_token_ids) instead")
        return streamer
    if not callable(streamer):
        raise ValueError(f"streamer must be a callable(row, new_token_ids) or an object with put/end, got "
                         f"{type(streamer).__name__}")
    return streamer


def check_generate_args(config, input_ids, max_new_tokens, threshold, max_draft, tree, temperature, top_k, top_p,
                        seed, eos, streamer, tree_topk, sibling_threshold, max_cache_len,
                        *, autoregressive: bool = False) -> GenerateArgs:
    """Every argument of generate (config: the model's, with vocab_size and max_context; max_cache_len: the
    decoder's, or None) checked and normalised. autoregressive: the baseline, which drafts nothing."""
    V = int(config.vocab_size)
    max_new, threshold, max_draft, temperature, top_k, top_p = check_settings(
        max_new_tokens, threshold, max_draft, temperature, top_k, top_p)
    if not (isinstance(tree, bool) or _is_np_bool(tree) or (_is_int(tree) and int(tree) in (0, 1))):
        raise ValueError(f"tree must be a bool, got {type(tree).__name__} {tree!r}")
    tree = bool(tree)
    hi = min(MAX_TREE_TOPK, V) if tree else None
    tree_topk = _int("tree_topk", tree_topk, 2, hi, what=f" in [2, min({MAX_TREE_TOPK}, vocab_size={V})]"
                     if tree else " >= 2")
    sibling_threshold = _real("sibling_threshold", sibling_threshold, "in [0, 1]")
    if not 0.0 <= sibling_threshold <= 1.0:
        raise ValueError(f"sibling_threshold must be in [0, 1], got {sibling_threshold!r}")
    if seed is not None:
        seed = _int("seed", seed, what=" (or None)")
    prompts, single = parse_ids(input_ids, V)
    eos = eos_list(eos, V)
    streamer = check_streamer(streamer, len(prompts))
    longest = max(len(p) for p in prompts)
    ctx = int(config.max_context)
    if longest + max_new > ctx:
        raise ValueError(f"request too long: prompt ({longest} tokens) + max_new_tokens ({max_new}) = "
                         f"{longest + max_new} exceeds the model's context of {ctx} tokens")
    N = 0 if autoregressive else (max_draft * tree_topk if tree else max_draft)
    if N + 1 > ctx:
        what = f"max_draft ({max_draft}) x tree_topk ({tree_topk})" if tree else f"max_draft ({max_draft})"
        raise ValueError(f"max_draft too large: the draft block of {what} nodes + 1 exceeds the model's context "
                         f"of {ctx} tokens")
    S = longest + max_new + N + 1
    if max_cache_len is not None and S > max_cache_len:
        raise ValueError(f"request too long for the cache: it needs {S} slots (prompt {longest} + "
                         f"max_new_tokens {max_new} + {N + 1} for the draft block), max_cache_len is "
                         f"{max_cache_len}")
    return GenerateArgs(prompts, single, max_new, threshold, max_draft, tree, temperature, top_k, top_p, seed, eos,
                        streamer, tree_topk, sibling_threshold, S)


def check_from_pretrained_args(path_or_hf_model, adapter, exit_layer, dtype, device) -> Tuple[Any, Any, int, Any,
                                                                                                Any]:
    """from_pretrained's arguments (path_or_hf_model is checked by LlamaModel.from_pretrained)."""
    from kangaroo.adapter import KangarooAdapter

    if adapter is not None and not isinstance(adapter, (str, os.PathLike, torch.nn.Module)):
        raise ValueError(f"adapter must be None, a KangarooAdapter or an adapter folder (str or path), got "
                         f"{type(adapter).__name__} {adapter!r}")
    if isinstance(adapter, torch.nn.Module) and not isinstance(adapter, KangarooAdapter):
        raise ValueError(f"adapter must be a KangarooAdapter, got {type(adapter).__name__}")
    if exit_layer is not None:  # None: the adapter's (or 2 for a fresh adapter)
        exit_layer = _int("exit_layer", exit_layer, 1, what=" >= 1 (or None)")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be None or a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    if device is not None:
        if not isinstance(device, (str, torch.device)) and not _is_int(device):
            raise ValueError(f"device must be None, a str, an int or a torch.device, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a device: {e}") from None
        if device.type == "meta":
            raise ValueError("device must hold real weights, not meta")
    return path_or_hf_model, adapter, exit_layer, dtype, device


def check_lookup_policy(policy) -> str:
    if policy not in ("auto", "merge", "first"):
        raise ValueError(f"lookup_policy must be 'auto', 'merge' or 'first', got {policy!r}")
    return policy


def check_lookup(lookup, lookup_max, lookup_ngram) -> Tuple[int, Tuple[int, int]]:
    """generate()'s lookup arguments -> (M, (n_min, n_max)), M = 0 when lookup is off; ValueError naming the
    argument."""
    if not isinstance(lookup, bool):
        raise ValueError(f"lookup must be True or False, got {lookup!r}")
    if not _is_int(lookup_max) or lookup_max < 1:
        raise ValueError(f"lookup_max must be an int >= 1, got {lookup_max!r}")
    if (not isinstance(lookup_ngram, (tuple, list)) or len(lookup_ngram) != 2
            or not all(_is_int(n) for n in lookup_ngram) or not 1 <= lookup_ngram[0] <= lookup_ngram[1]):
        raise ValueError(f"lookup_ngram must be a pair of ints (n_min, n_max) with 1 <= n_min <= n_max, "
                         f"got {lookup_ngram!r}")
    return (lookup_max if lookup else 0), (int(lookup_ngram[0]), int(lookup_ngram[1]))


def check_draft_head(mode, device: torch.device) -> None:
    """KangarooDecoder(draft_head=mode) for a model on `device`: ValueError unless it is a mode that runs there."""
    if mode not in ("auto", "int8", "exact"):
        raise ValueError(f"draft_head must be 'auto', 'int8' or 'exact', got {mode!r}")
    if mode == "int8" and device.type != "cpu":
        raise ValueError(f"draft_head='int8' runs on CPU models (this one is on {device})")
