"""A compact Llama-family decoder (Llama, Mistral, Qwen2) over a static KV cache, gpt-fast style.

No HF modeling code runs here: the weights are plain tensors (q/k/v fused into one matrix, gate/up fused), the
attention is kangaroo_kernels.append_attention (decode, chain and tree blocks) and the maths follows HF's
roundings (fp32 RMSNorm statistics, rotate-half RoPE with the checkpoint's rope settings, SwiGLU, optional q/k/v
bias, tied or untied LM head).

Cache convention (used by the decoder): every token at sequence position p has its K/V at cache slot p of its row,
in every layer; the caller's cache_lens[b] is the number of committed slots of row b. Layers [a, b) can be run on any
hidden states (`forward_layers`), which is how the decoder runs the shallow part (layers 0..exit_layer-1) and the deep
part (exit_layer..L-1) separately; the hidden state after `exit_layer` layers is "the layer-l hidden state".
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from kangaroo_kernels._ext import ops as _native
from kangaroo_kernels.ops.append_attention import append_attention
from kangaroo_kernels.reference.adapter_forward import rms_norm_ref as rms_norm  # HF LlamaRMSNorm rounding
from kangaroo_kernels.rope import make_rope_cos_sin

__all__ = ["ModelConfig", "KVCache", "LlamaModel", "rms_norm", "fingerprint_of"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


@dataclasses.dataclass
class ModelConfig:
    """The few numbers the forward needs, read from an HF config object or a config.json dict."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None

    @classmethod
    def from_hf(cls, cfg) -> "ModelConfig":
        model_type = _get(cfg, "model_type", "llama") or "llama"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}: kangaroo supports {SUPPORTED_MODEL_TYPES}")
        D = int(_get(cfg, "hidden_size"))
        H = int(_get(cfg, "num_attention_heads"))
        Hk = int(_get(cfg, "num_key_value_heads", None) or H)
        Dh = int(_get(cfg, "head_dim", None) or D // H)
        theta, scaling = rope_settings(cfg)
        bias = model_type == "qwen2" or bool(_get(cfg, "attention_bias", False))
        window = None
        if model_type == "mistral":
            window = _get(cfg, "sliding_window", None)
        elif model_type == "qwen2" and _get(cfg, "use_sliding_window", False):
            window = _get(cfg, "sliding_window", None)
        act = _get(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r} (the Llama family uses silu)")
        return cls(model_type=model_type, hidden_size=D, num_hidden_layers=int(_get(cfg, "num_hidden_layers")),
                   num_attention_heads=H, num_key_value_heads=Hk, head_dim=Dh,
                   intermediate_size=int(_get(cfg, "intermediate_size")), vocab_size=int(_get(cfg, "vocab_size")),
                   rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                   attention_bias=bias, tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
                   max_position_embeddings=int(_get(cfg, "max_position_embeddings", 4096) or 4096),
                   sliding_window=int(window) if window else None)

    @property
    def max_context(self) -> int:
        """The longest sequence this forward computes exactly (positions, and Mistral's sliding window)."""
        n = self.max_position_embeddings
        if self.rope_scaling and self.rope_scaling.get("rope_type") not in (None, "default", "linear", "llama3"):
            n = max(n, int(self.rope_scaling.get("original_max_position_embeddings", n)))
        return min(n, self.sliding_window) if self.sliding_window else n


def rope_settings(cfg):
    """(rope_theta, rope_scaling dict or None) from transformers 4.x (rope_theta, rope_scaling) or 5.x
    (rope_parameters) configs and config.json dicts."""
    params = _get(cfg, "rope_parameters", None) or _get(cfg, "rope_scaling", None) or {}
    params = dict(params)
    theta = params.get("rope_theta", None) or _get(cfg, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    params.pop("rope_theta", None)
    if "original_max_position_embeddings" not in params and rope_type == "llama3":
        params["original_max_position_embeddings"] = _get(cfg, "max_position_embeddings", 8192)
    return float(theta), params


def fingerprint_of(lm_head_weight: torch.Tensor) -> str:
    """A hash of the LM head that ties an adapter to its base model. Independent of the load dtype (values are
    rounded to bf16 first) and of the device; it reads an evenly spaced subset of at most 1024 rows."""
    w = lm_head_weight.detach()
    V, D = w.shape
    step = max(1, V // 1024)
    sub = w[::step].to(device="cpu", dtype=torch.bfloat16).contiguous()
    h = hashlib.sha256(f"{V}x{D}:".encode())
    h.update(sub.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclasses.dataclass
class KVCache:
    """Static cache: k, v [layers, B, Hk, S, Dh]. The committed lengths live with the caller (one cache_lens [B]
    for all layers: the decoder's)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class LlamaModel:
    """The base model's weights as plain tensors plus a forward over a static KV cache."""

    def __init__(self, config: ModelConfig, weights: Dict[str, Any]):
        self.config = config
        tied = weights["lm_head"] is weights["embed"]
        self.embed_tokens: torch.Tensor = _cpu_colmajor(weights["embed"])
        self.layers: List[Dict[str, torch.Tensor]] = [_cpu_layout(lay) for lay in weights["layers"]]
        self.norm: torch.Tensor = weights["norm"]
        self.lm_head: torch.Tensor = self.embed_tokens if tied else _cpu_colmajor(weights["lm_head"])
        # CPU fp32: a packed copy of the head for the logits (small_gemm.h: verify rows get the plain step's bits)
        self._lm_head_packed: Optional[torch.Tensor] = _pack(self.lm_head) if _packs(self.lm_head) else None
        self._rope: Optional[torch.Tensor] = None
        self._fingerprint: Optional[str] = None
        # the layers' weights as llama_layer takes them, 7 per layer (forward_layers on CPU: one call for them all)
        self._layer_args: List[Optional[torch.Tensor]] = [
            lay.get(k) for lay in self.layers for k in ("ln1", "wqkv", "bqkv", "wo", "ln2", "wgu", "wd")]

    # ------------------------------------------------------------------ loading
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @classmethod
    def from_pretrained(cls, path_or_hf_model, dtype: Optional[torch.dtype] = None, device=None) -> "LlamaModel":
        """From a local HF checkpoint folder (config.json + *.safetensors, sharded or not) or an in-memory
        transformers model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM). dtype defaults to the
        weights' own dtype, device to the in-memory model's device (or CPU for a folder)."""
        if isinstance(path_or_hf_model, LlamaModel):
            m = path_or_hf_model
            return m if dtype is None and device is None else m.to(dtype=dtype, device=device)
        if isinstance(path_or_hf_model, (str, os.PathLike)):
            path = os.fspath(path_or_hf_model)
            if not os.path.isdir(path):
                raise ValueError(f"{path!r} is not a local checkpoint folder (config.json + *.safetensors)")
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                raise ValueError(f"{path!r} has no config.json")
            with open(cfg_path) as f:
                raw_cfg = json.load(f)
            config = ModelConfig.from_hf(raw_cfg)
            sd = _load_safetensors(path)
            default_device = torch.device("cpu")
        elif isinstance(path_or_hf_model, torch.nn.Module) and hasattr(path_or_hf_model, "config"):
            config = ModelConfig.from_hf(path_or_hf_model.config)
            sd = dict(path_or_hf_model.state_dict())
            default_device = next(path_or_hf_model.parameters()).device
        else:
            raise ValueError(f"expected a checkpoint folder or a transformers model, got "
                             f"{type(path_or_hf_model).__name__}")
        device = torch.device(device) if device is not None else default_device
        weights = _weights_from_state_dict(config, sd, dtype, device)
        return cls(config, weights)

    def to(self, dtype=None, device=None) -> "LlamaModel":
        def cv(t):
            return None if t is None else t.to(dtype=dtype or t.dtype, device=device or t.device)

        tied = self.lm_head is self.embed_tokens
        w = {"embed": cv(self.embed_tokens), "norm": cv(self.norm),
             "layers": [{k: cv(v) for k, v in self.layer_weights(i).items()} for i in range(len(self.layers))]}
        w["lm_head"] = w["embed"] if tied else cv(self.lm_head)
        return LlamaModel(self.config, w)

    def fingerprint(self) -> str:
        """Hash of the LM head weights (ties an adapter to its base model)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.lm_head)
        return self._fingerprint

    def layer_weights(self, i: int) -> Dict[str, torch.Tensor]:
        """Layer i's weights in their logical [N, K] shapes (self.layers may hold them packed for the CPU)."""
        c = self.config
        rows = {"wqkv": (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, "wo": c.hidden_size,
                "wgu": 2 * c.intermediate_size, "wd": c.hidden_size}
        return {k: _native().unpack_gemm_weight(t, rows[k]) if k in rows and t.dim() == 3 else t
                for k, t in self.layers[i].items()}

    # ------------------------------------------------------------------ cache and RoPE
    def new_cache(self, batch_size: int, max_len: int, num_layers: Optional[int] = None) -> KVCache:
        c = self.config
        n = c.num_hidden_layers if num_layers is None else num_layers
        shape = (n, batch_size, c.num_key_value_heads, max_len, c.head_dim)
        return KVCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device))

    def rope_cos_sin(self, max_pos: int) -> torch.Tensor:
        """The fp32 [>= max_pos, Dh] RoPE table (cached, grown on demand)."""
        if self._rope is None or self._rope.shape[0] < max_pos:
            c = self.config
            n = max(max_pos, 256)
            # HF's fp32 rounding, on the CPU as HF computes it
            self._rope = make_rope_cos_sin(n, c.head_dim, c.rope_theta, scaling=c.rope_scaling,
                                           dtype=torch.float32).to(self.device)
        return self._rope

    # ------------------------------------------------------------------ forward pieces
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens.long(), self.embed_tokens)

    def layer(self, i: int, x: torch.Tensor, cache: KVCache, cache_lens: torch.Tensor, positions: torch.Tensor,
              *, tree_mask: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None,
              rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder layer i on x[B,T,D] at positions[B,T]; appends K/V at cache slots cache_lens[b] + t (not
        advancing cache_lens). Rows with active False write nothing (their output is meaningless)."""
        c = self.config
        p = self.layers[i]
        if rope is None:
            rope = self.rope_cos_sin(cache.max_len)
        if x.device.type == "cpu":  # the same maths in one C++ op (csrc/cpu/llama_layer.cpp): no per-op overhead
            return _native().llama_layer(
                x, p["ln1"], p["wqkv"], p.get("bqkv"), p["wo"], p["ln2"], p["wgu"], p["wd"], cache.k, cache.v, i,
                cache_lens, positions, tree_mask, active, rope, c.rms_norm_eps, c.num_attention_heads,
                c.num_key_value_heads)
        B, T, D = x.shape
        Hq, Hk, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        h = rms_norm(x, p["ln1"], c.rms_norm_eps)
        qkv = F.linear(h, p["wqkv"], p.get("bqkv"))
        q, k, v = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
        a = append_attention(q.reshape(B, T, Hq, Dh), k.reshape(B, T, Hk, Dh), v.reshape(B, T, Hk, Dh),
                             cache.k[i], cache.v[i], cache_lens, tree_mask=tree_mask, active=active,
                             positions=positions, rope_cos_sin=rope, validate=False)
        x = x + F.linear(a.reshape(B, T, Hq * Dh), p["wo"])
        h = rms_norm(x, p["ln2"], c.rms_norm_eps)
        gate, up = F.linear(h, p["wgu"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, p["wd"])

    def forward_layers(self, x: torch.Tensor, start: int, end: int, cache: KVCache, cache_lens: torch.Tensor,
                       positions: torch.Tensor, *, tree_mask=None, active=None) -> torch.Tensor:
        """Layers [start, end) (0-based) on hidden states x[B,T,D]; returns the hidden state after layer end-1.
        forward_layers(embed(t), 0, l, ...) is the layer-l hidden state (the shallow sub-network)."""
        rope = self.rope_cos_sin(cache.max_len)
        if x.device.type == "cpu" and end > start + 1:  # the layers in one native call (llama_layers)
            c = self.config
            return _native().llama_layers(x, self._layer_args[7 * start:7 * end], cache.k, cache.v, start,
                                          cache_lens, positions, tree_mask, active, rope, c.rms_norm_eps,
                                          c.num_attention_heads, c.num_key_value_heads)
        for i in range(start, end):
            x = self.layer(i, x, cache, cache_lens, positions, tree_mask=tree_mask, active=active, rope=rope)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and LM head; fp32 logits."""
        c = self.config
        if self._lm_head_packed is not None and h.device.type == "cpu" and h.dtype == self.norm.dtype == torch.float32:
            return _native().lm_logits(h, self.norm, c.rms_norm_eps, self._lm_head_packed, c.vocab_size)
        return F.linear(rms_norm(h, self.norm, c.rms_norm_eps), self.lm_head).float()


def _cpu_colmajor(t: torch.Tensor) -> torch.Tensor:
    """CPU: a matrix stored column-major (same [N, K] shape and values, strides (1, N)), so F.linear hands MKL a
    contiguous [K, N] operand. Measured here (one core, 8-layer demo shape, A/B in one process): a plain step's
    layers 6-16 % faster, a 5-row verify block 3-20 % faster (6x when the weights sit in L2), the 4096 x 256 LM-head
    GEMV 24 % faster from memory. Other devices keep the checkpoint's row-major layout."""
    if t.device.type == "cpu" and t.dim() == 2:
        return t.t().contiguous().t()
    return t


def _packs(w: torch.Tensor) -> bool:
    """Whether the CPU decoder keeps this weight packed (kangaroo_kernels.pack_gemm_weight): fp32 on CPU."""
    return w.device.type == "cpu" and w.dtype == torch.float32


def _pack(w: torch.Tensor) -> torch.Tensor:
    """pack_gemm_weight, as bf16 pairs when every value is a bf16 (a bf16 checkpoint run in fp32, like the shipped
    demo model): half the bytes to stream per step and the same bits as the fp32 layout (csrc/cpu/small_gemm.h)."""
    return _native().pack_gemm_weight(w, bool(torch.equal(w, w.bfloat16().float())))


def _cpu_layout(layer: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU: fp32 layer weights packed (_pack) for llama_layer's hand-written small-batch GEMMs (csrc/cpu/small_gemm.h:
    a verify block's rows share one pass over each weight, and a row's result does not depend on the block); other
    dtypes column-major for MKL. Other devices keep the checkpoint's layout."""
    w = layer["wqkv"]
    if w.device.type != "cpu":
        return layer
    pack = _pack if _packs(w) else _cpu_colmajor
    return {k: pack(t) if k in ("wqkv", "wo", "wgu", "wd") else t for k, t in layer.items()}


# ---------------------------------------------------------------------- weight loading
def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        files = [f for f in files if os.path.basename(f) != "adapter.safetensors"]
    if not files:
        raise ValueError(f"{path!r} holds no *.safetensors weights")
    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


def _weights_from_state_dict(c: ModelConfig, sd: Dict[str, torch.Tensor], dtype, device) -> Dict[str, Any]:
    prefix = "model." if "model.embed_tokens.weight" in sd else ""
    used = set()

    def get(name, required=True):
        key = name if name == "lm_head.weight" else prefix + name
        if key not in sd:
            if required:
                raise ValueError(f"checkpoint lacks weight {key!r} (model_type {c.model_type})")
            return None
        used.add(key)
        t = sd[key]
        return t.detach().to(device=device, dtype=dtype or t.dtype)

    embed = get("embed_tokens.weight")
    Hq, Hk, Dh, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    if tuple(embed.shape) != (c.vocab_size, D):
        raise ValueError(f"embed_tokens.weight has shape {tuple(embed.shape)}, config says [{c.vocab_size}, {D}]")
    layers = []
    for i in range(c.num_hidden_layers):
        pre = f"layers.{i}."
        wq, wk, wv = (get(pre + f"self_attn.{n}_proj.weight") for n in "qkv")
        if wq.shape != (Hq * Dh, D) or wk.shape != (Hk * Dh, D):
            raise ValueError(f"layer {i}: q/k proj shapes {tuple(wq.shape)}, {tuple(wk.shape)} do not match the "
                             f"config (Hq={Hq}, Hk={Hk}, Dh={Dh}, D={D})")
        lay = {"ln1": get(pre + "input_layernorm.weight"), "wqkv": torch.cat([wq, wk, wv], 0).contiguous(),
               "wo": get(pre + "self_attn.o_proj.weight"), "ln2": get(pre + "post_attention_layernorm.weight"),
               "wgu": torch.cat([get(pre + "mlp.gate_proj.weight"), get(pre + "mlp.up_proj.weight")], 0).contiguous(),
               "wd": get(pre + "mlp.down_proj.weight")}
        bq = get(pre + "self_attn.q_proj.bias", required=False)
        if bq is not None:
            lay["bqkv"] = torch.cat([bq, get(pre + "self_attn.k_proj.bias"), get(pre + "self_attn.v_proj.bias")])
        elif c.attention_bias and c.model_type != "qwen2":
            raise ValueError(f"config says attention_bias but layer {i} has no q_proj.bias")
        if prefix + pre + "self_attn.o_proj.bias" in sd:
            raise ValueError(f"layer {i}: an o_proj bias is not supported (Llama family: none)")
        layers.append(lay)
    norm = get("norm.weight")
    lm = sd.get("lm_head.weight")
    if c.tie_word_embeddings or lm is None:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight")
    return {"embed": embed, "layers": layers, "norm": norm, "lm_head": lm_head}
