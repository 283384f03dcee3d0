"""The Kangaroo adapter: a(h) = RMSNorm_out(h + MHA(RMSNorm_in(h))), h = the base model's layer-l hidden state.

One Llama attention block (RoPE with the base model's settings, the base model's head layout, q/k/v bias when the
base has it), no MLP, default nn.Linear init. The draft logits are the BASE model's LM head applied to a(h).

- `forward(h[B,T,D], position_ids[B,T])`: the full causal sequence in plain torch, differentiable, no cache
  (training).
- `weights()`: the parameters as kangaroo_kernels.AdapterWeights for the decode kernels (adapter_forward), and
  `prefill(...)`: the adapter over a block of T tokens appended to its static cache (prompt processing).
- `save_pretrained(dir, base_fingerprint=...)` writes adapter.safetensors + adapter_config.json;
  `from_pretrained(dir, base_model=None)` checks every key and shape, and refuses an adapter trained for another
  base model (fingerprint of the LM head) with a ValueError. It also loads the official Kangaroo release format
  (github.com/Equationliu/Kangaroo: config.json with num_hidden_layers 1 + pytorch_model.bin of its AdapterModel).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kangaroo.model import ModelConfig, rms_norm
from kangaroo_kernels.rope import make_rope_cos_sin

__all__ = ["KangarooAdapter", "attend_block", "ADAPTER_WEIGHTS_NAME", "ADAPTER_CONFIG_NAME"]

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_FORMAT = "kangaroo-adapter-v1"

# The official release (Equationliu/Kangaroo, kangaroo/adapter.py AdapterModel): a one-layer LlamaModel without
# embeddings. Keys it needs -> ours; keys of its unused sub-modules (the MLP and post-attention norm of the
# checkpointed layer, the rotary buffer) are ignored, and loading says so.
_OFFICIAL_KEYS = {"layers.0.input_layernorm.weight": "input_layernorm.weight",
                  "layers.0.self_attn.q_proj.weight": "self_attn.q_proj.weight",
                  "layers.0.self_attn.k_proj.weight": "self_attn.k_proj.weight",
                  "layers.0.self_attn.v_proj.weight": "self_attn.v_proj.weight",
                  "layers.0.self_attn.o_proj.weight": "self_attn.o_proj.weight",
                  "norm.weight": "norm.weight"}
_OFFICIAL_UNUSED = ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
                    "layers.0.post_attention_layernorm.weight", "layers.0.self_attn.rotary_emb.inv_freq")
_OFFICIAL_WEIGHTS = ("pytorch_model.bin", "model.safetensors")


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class _Attention(nn.Module):
    def __init__(self, D, Hq, Hk, Dh, bias):
        super().__init__()
        self.q_proj = nn.Linear(D, Hq * Dh, bias=bias)
        self.k_proj = nn.Linear(D, Hk * Dh, bias=bias)
        self.v_proj = nn.Linear(D, Hk * Dh, bias=bias)
        self.o_proj = nn.Linear(Hq * Dh, D, bias=False)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class KangarooAdapter(nn.Module):
    """Parameters (HF names): input_layernorm.weight, self_attn.{q,k,v,o}_proj.weight (+ q/k/v bias when
    attention_bias), norm.weight (the output norm)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6,
                 attention_bias: bool = False, exit_layer: int = 2, rope_scaling: Optional[Dict[str, Any]] = None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if exit_layer < 1:
            raise ValueError(f"exit_layer must be >= 1, got {exit_layer}")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, \
            head_dim
        self.rope_theta, self.rope_scaling = float(rope_theta), (dict(rope_scaling) if rope_scaling else None)
        self.rms_norm_eps, self.attention_bias, self.exit_layer = float(rms_norm_eps), bool(attention_bias), \
            int(exit_layer)
        self.base_fingerprint: Optional[str] = None
        self.input_layernorm = _RMSNorm(hidden_size, rms_norm_eps)
        self.self_attn = _Attention(hidden_size, num_heads, num_kv_heads, head_dim, attention_bias)
        self.norm = _RMSNorm(hidden_size, rms_norm_eps)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model_or_hf_config, exit_layer: int = 2) -> "KangarooAdapter":
        """An adapter shaped for a base model: a kangaroo LlamaModel, a transformers model, its config, a
        ModelConfig or a config.json dict. Records the base model's fingerprint when it can compute it."""
        obj = model_or_hf_config
        fp = None
        if hasattr(obj, "fingerprint") and callable(obj.fingerprint):  # LlamaModel / KangarooDecoder
            fp = obj.fingerprint()
        elif isinstance(obj, nn.Module) and hasattr(obj, "get_output_embeddings"):
            from kangaroo.model import fingerprint_of

            fp = fingerprint_of(obj.get_output_embeddings().weight)
        cfg = getattr(obj, "config", obj)
        if not isinstance(cfg, ModelConfig):
            cfg = ModelConfig.from_hf(cfg)
        if not 1 <= exit_layer < cfg.num_hidden_layers:
            raise ValueError(f"exit_layer must be in [1, {cfg.num_hidden_layers - 1}] for a base model with "
                             f"{cfg.num_hidden_layers} layers, got {exit_layer}")
        ad = cls(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                 rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias,
                 exit_layer=exit_layer, rope_scaling=cfg.rope_scaling)
        ad.base_fingerprint = fp
        if isinstance(obj, nn.Module) or hasattr(obj, "embed_tokens"):
            w = getattr(obj, "embed_tokens", None)
            if w is None and hasattr(obj, "get_input_embeddings"):
                w = obj.get_input_embeddings().weight
            if isinstance(w, torch.Tensor):
                ad.to(device=w.device, dtype=w.dtype)
        return ad

    @classmethod
    def resolve(cls, adapter, model, exit_layer: Optional[int] = None) -> "KangarooAdapter":
        """The adapter for `model` (a LlamaModel): a KangarooAdapter as given, an adapter folder loaded (and checked
        against the base), or None: a freshly initialised adapter at exit_layer (default 2), with a warning. An
        exit_layer that contradicts the adapter's raises ValueError."""
        L = model.config.num_hidden_layers
        if adapter is None:
            exit_layer = 2 if exit_layer is None else exit_layer
            if not 1 <= exit_layer < L:
                raise ValueError(f"exit_layer must be an int in [1, {L - 1}] for this {L}-layer model, "
                                 f"got {exit_layer!r}")
            warnings.warn("KangarooDecoder: no adapter given, using a freshly initialised (untrained) adapter: "
                          "output is exact but acceptance will be low. Train one with `kangaroo train`.",
                          stacklevel=3)
            adapter = cls.for_model(model, exit_layer)
        elif not isinstance(adapter, cls):
            adapter = cls.from_pretrained(adapter, base_model=model, map_location=model.device)
        if exit_layer is not None and exit_layer != adapter.exit_layer:
            raise ValueError(f"exit_layer={exit_layer} contradicts the adapter's exit layer {adapter.exit_layer}")
        return adapter

    def config_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "exit_layer": self.exit_layer, "hidden_size": self.hidden_size,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "rms_norm_eps": self.rms_norm_eps,
                "attention_bias": self.attention_bias, "base_fingerprint": self.base_fingerprint}

    # ------------------------------------------------------------------ training forward
    def rope(self, position_ids: torch.Tensor):
        """cos, sin [B,T,Dh] fp32 at position_ids (HF's rotary embedding maths)."""
        cos, sin = make_rope_cos_sin(position_ids, self.head_dim, self.rope_theta, scaling=self.rope_scaling,
                                     dtype=torch.float32).chunk(2, dim=-1)
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def forward(self, h: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h[B,T,D] (layer-l hidden states) -> a(h) [B,T,D], causal over the sequence. position_ids[B,T]
        default 0..T-1; attention_mask[B,T] (1 = real token, 0 = padding) optionally hides padded keys."""
        B, T, D = h.shape
        Hq, Hk, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if position_ids is None:
            position_ids = torch.arange(T, device=h.device)[None].expand(B, T)
        x = self.input_layernorm(h)
        a = self.self_attn
        q = a.q_proj(x).view(B, T, Hq, Dh).transpose(1, 2)
        k = a.k_proj(x).view(B, T, Hk, Dh).transpose(1, 2)
        v = a.v_proj(x).view(B, T, Hk, Dh).transpose(1, 2)
        cos, sin = self.rope(position_ids)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if Hq != Hk:
            k = k.repeat_interleave(Hq // Hk, dim=1)
            v = v.repeat_interleave(Hq // Hk, dim=1)
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=h.device)  # a padded query sees itself: no NaN
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = a.o_proj(o.transpose(1, 2).reshape(B, T, Hq * Dh))
        return self.norm(h + o)

    # ------------------------------------------------------------------ decode path
    def weights(self):
        """kangaroo_kernels.AdapterWeights views of the parameters (detached) for adapter_forward."""
        from kangaroo_kernels.types import AdapterWeights

        a = self.self_attn
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return AdapterWeights(d(self.input_layernorm.weight), d(a.q_proj.weight), d(a.k_proj.weight),
                              d(a.v_proj.weight), d(a.o_proj.weight), d(self.norm.weight), self.num_heads,
                              self.num_kv_heads, d(a.q_proj.bias), d(a.k_proj.bias), d(a.v_proj.bias))

    @torch.no_grad()
    def prefill(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                positions: torch.Tensor, rope_cos_sin: torch.Tensor, active: Optional[torch.Tensor] = None,
                apply_out_norm: bool = True) -> torch.Tensor:
        """The adapter over a block h[B,T,D] appended to its cache k/v_cache[B,Hk,S,Dh] at cache_lens (not
        advanced), causal inside the block; the same maths as adapter_forward (T = 1) through append_attention."""
        w = self.weights()
        o = attend_block(w, self.rms_norm_eps, h, k_cache, v_cache, cache_lens, positions, rope_cos_sin, active)
        r = h + F.linear(o.flatten(2), w.wo)
        return rms_norm(r, w.norm_out, self.rms_norm_eps) if apply_out_norm else r

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_dir, base_fingerprint: Optional[str] = None) -> None:
        from safetensors.torch import save_file

        os.makedirs(save_dir, exist_ok=True)
        if base_fingerprint is not None:
            self.base_fingerprint = base_fingerprint
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(save_dir, ADAPTER_WEIGHTS_NAME), metadata={"format": _FORMAT})
        with open(os.path.join(save_dir, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(self.config_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, load_dir, base_model=None, map_location=None,
                        exit_layer: Optional[int] = None) -> "KangarooAdapter":
        """Loads save_pretrained's folder, or an official Kangaroo release folder (config.json + pytorch_model.bin,
        see _load_official; exit_layer then defaults to 2, the paper's setting for 7B models). Every key must be
        present with its shape (no strict=False); with base_model (a kangaroo LlamaModel, KangarooDecoder or
        transformers model) its dimensions and LM-head fingerprint must match the adapter's, else ValueError."""
        from safetensors.torch import load_file

        load_dir = os.fspath(load_dir)
        cfg_path = os.path.join(load_dir, ADAPTER_CONFIG_NAME)
        w_path = os.path.join(load_dir, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(cfg_path) and os.path.isfile(os.path.join(load_dir, "config.json")):
            ad = cls._load_official(load_dir, map_location, 2 if exit_layer is None else exit_layer)
            if base_model is not None:
                ad.check_base(base_model)
            return ad
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise ValueError(f"{load_dir!r} is not a Kangaroo adapter folder: missing {os.path.basename(p)}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"{cfg_path}: unknown adapter format {cfg.get('format')!r} (expected {_FORMAT!r})")
        if exit_layer is not None and exit_layer != cfg["exit_layer"]:
            raise ValueError(f"exit_layer={exit_layer} does not match the adapter's exit_layer {cfg['exit_layer']}")
        ad = cls(cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"],
                 rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["rms_norm_eps"],
                 attention_bias=cfg["attention_bias"], exit_layer=cfg["exit_layer"],
                 rope_scaling=cfg.get("rope_scaling"))
        ad.base_fingerprint = cfg.get("base_fingerprint")
        sd = load_file(w_path, device=str(map_location) if map_location is not None else "cpu")
        want = ad.state_dict()
        missing = sorted(set(want) - set(sd))
        unexpected = sorted(set(sd) - set(want))
        if missing or unexpected:
            raise ValueError(f"adapter weights in {w_path} do not match the adapter config: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        for k, t in want.items():
            if tuple(sd[k].shape) != tuple(t.shape):
                raise ValueError(f"adapter weight {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
        dtype = next(iter(sd.values())).dtype
        ad.to(dtype=dtype, device=map_location or "cpu")
        ad.load_state_dict(sd, strict=True)
        if base_model is not None:
            ad.check_base(base_model)
        return ad

    @classmethod
    def _load_official(cls, load_dir: str, map_location, exit_layer: int) -> "KangarooAdapter":
        """The official release format: a LlamaConfig-style config.json (num_hidden_layers 1) and
        pytorch_model.bin (or model.safetensors) holding AdapterModel's state dict. Its rotary embedding is
        LlamaRotaryEmbedding's default (base 10000, whatever config.rope_theta says), head_dim = hidden_size /
        num_attention_heads, no q/k/v bias: the adapter is built the same way."""
        import warnings

        with open(os.path.join(load_dir, "config.json")) as f:
            cfg = json.load(f)
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
            if key not in cfg:
                raise ValueError(f"{load_dir}/config.json lacks {key!r}: not a Kangaroo adapter config")
        if cfg["num_hidden_layers"] != 1:
            raise ValueError(f"{load_dir}/config.json has num_hidden_layers={cfg['num_hidden_layers']}: an "
                             f"official Kangaroo adapter has exactly 1 (is this a base model folder?)")
        w_path = next((os.path.join(load_dir, n) for n in _OFFICIAL_WEIGHTS
                       if os.path.isfile(os.path.join(load_dir, n))), None)
        if w_path is None:
            raise ValueError(f"{load_dir!r} has a config.json but no {' or '.join(_OFFICIAL_WEIGHTS)} (official "
                             f"Kangaroo adapter) and no {ADAPTER_CONFIG_NAME} (this library's format)")
        if w_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(w_path)
        else:
            sd = torch.load(w_path, map_location="cpu", weights_only=True)
        missing = sorted(k for k in _OFFICIAL_KEYS if k not in sd)
        unknown = sorted(k for k in sd if k not in _OFFICIAL_KEYS and k not in _OFFICIAL_UNUSED)
        if missing or unknown:
            raise ValueError(f"{w_path} is not an official Kangaroo adapter: missing keys {missing}, unknown keys "
                             f"{unknown}")
        ignored = sorted(k for k in sd if k in _OFFICIAL_UNUSED)
        if ignored:
            warnings.warn(f"{w_path}: ignoring the keys the adapter does not use: {', '.join(ignored)}",
                          stacklevel=3)
        D, Hq = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        ad = cls(D, Hq, int(cfg.get("num_key_value_heads") or Hq), D // Hq, rope_theta=10000.0,
                 rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), attention_bias=False, exit_layer=exit_layer)
        theirs = {ours: sd[k] for k, ours in _OFFICIAL_KEYS.items()}
        for k, t in ad.state_dict().items():
            if tuple(theirs[k].shape) != tuple(t.shape):
                raise ValueError(f"official adapter weight for {k!r} has shape {tuple(theirs[k].shape)}, expected "
                                 f"{tuple(t.shape)} from {load_dir}/config.json")
        dtype = theirs["norm.weight"].dtype
        ad.to(dtype=dtype, device=map_location or "cpu")
        ad.load_state_dict(theirs, strict=True)
        return ad

    def check_base(self, base_model) -> None:
        """Raises ValueError unless this adapter fits base_model (dims, exit layer, LM-head fingerprint)."""
        from kangaroo.model import fingerprint_of

        model = getattr(base_model, "model", base_model) if hasattr(base_model, "adapter") else base_model
        if hasattr(model, "fingerprint") and callable(model.fingerprint):
            fp = model.fingerprint()
            cfg = model.config
        elif isinstance(model, nn.Module) and hasattr(model, "get_output_embeddings"):
            fp = fingerprint_of(model.get_output_embeddings().weight)
            cfg = model.config
        else:
            raise ValueError(f"base_model must be a kangaroo LlamaModel or a transformers model, got "
                             f"{type(base_model).__name__}")
        if not isinstance(cfg, ModelConfig):
            cfg = ModelConfig.from_hf(cfg)
        dims = {"hidden_size": (self.hidden_size, cfg.hidden_size),
                "num_heads": (self.num_heads, cfg.num_attention_heads),
                "num_kv_heads": (self.num_kv_heads, cfg.num_key_value_heads),
                "head_dim": (self.head_dim, cfg.head_dim),
                "attention_bias": (self.attention_bias, cfg.attention_bias)}
        bad = {k: v for k, v in dims.items() if v[0] != v[1]}
        if bad:
            raise ValueError("this adapter was built for another model: (adapter, base) differ in " +
                             ", ".join(f"{k} {a} vs {b}" for k, (a, b) in bad.items()))
        if not 1 <= self.exit_layer < cfg.num_hidden_layers:
            raise ValueError(f"adapter exit_layer {self.exit_layer} does not fit a base model with "
                             f"{cfg.num_hidden_layers} layers (need 1 <= exit_layer < {cfg.num_hidden_layers})")
        if self.base_fingerprint is not None and self.base_fingerprint != fp:
            raise ValueError(f"this adapter was trained for another base model: its LM-head fingerprint "
                             f"{self.base_fingerprint} != the base model's {fp}. Train an adapter for this model "
                             f"(kangaroo train) or load the matching base model.")


def attend_block(w, eps: float, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cache_lens: torch.Tensor, positions: torch.Tensor, rope_cos_sin: torch.Tensor,
                 active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The adapter's attention (w: AdapterWeights) over a block h[B,T,D] at positions[B,T], its K/V appended to
    k/v_cache[B,Hk,S,Dh] at cache_lens[B] (causal inside the block) -> o [B,T,Hq,Dh], before o_proj."""
    from kangaroo_kernels.ops.append_attention import append_attention

    B, T, _ = h.shape
    x = rms_norm(h, w.norm_in, eps)
    q = F.linear(x, w.wq, w.bq).view(B, T, w.num_heads, w.head_dim)
    k = F.linear(x, w.wk, w.bk).view(B, T, w.num_kv_heads, w.head_dim)
    v = F.linear(x, w.wv, w.bv).view(B, T, w.num_kv_heads, w.head_dim)
    return append_attention(q, k, v, k_cache, v_cache, cache_lens, active=active, positions=positions,
                            rope_cos_sin=rope_cos_sin, validate=False)
