"""torch.distributed for adapter training: process-group setup from torchrun's environment, the few collectives the
trainer needs, and sharding of the frozen base model (FSDP2 `fully_shard`, one unit per decoder layer).

    torchrun --nproc_per_node N -m kangaroo.cli train --model DIR --data FILES --out DIR ...
    torchrun --nnodes M --node_rank R --master_addr HOST --master_port P --nproc_per_node N -m kangaroo.cli train ...

`init_from_env` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (env:// rendezvous), takes NCCL with
device cuda:LOCAL_RANK where CUDA is available and gloo on CPU. Without those variables (or WORLD_SIZE=1) it starts
no process group and training is the plain single-process loop. Everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistInfo:
    """The initialised default process group (rank, world size, backend), or the single-process info."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                    dist.get_backend())


def init_from_env(device: str | None = None):
    """Starts the default process group from torchrun's variables and picks this rank's device.

    device: None (cuda:LOCAL_RANK where CUDA is available, else cpu), "cpu", or "cuda" / "cuda:k" (under torchrun
    always cuda:LOCAL_RANK: one process per GPU). Returns (DistInfo, torch.device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if world <= 1:
        dev = torch.device(device) if device is not None else torch.device("cuda" if want_cuda else "cpu")
        return DistInfo(), dev
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if k not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {k} is not set: launch with torchrun (env:// rendezvous)")
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asks for CUDA, which is not available")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", **kw)
    return current(), dev


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    """In-place sum over ranks (a no-op on one process); returns t."""
    import torch.distributed as dist

    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (pickled: tensors keep the device they had on `src`, so send CPU tensors).
    The identity on one process."""
    import torch.distributed as dist

    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if current().enabled:
        dist.barrier()


def decoder_layers(base):
    """The ModuleList of decoder layers of an HF causal LM (Llama / Mistral / Qwen2: base.model.layers)."""
    dec = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (expected .model.layers)")
    return layers


def shard_base(base, device):
    """Shards the frozen base model's decoder layers over all ranks with FSDP2 (`fully_shard`, one unit per layer,
    parameters resharded after each layer's forward), and puts the rest (embeddings, final norm, LM head, rotary
    tables: needed whole by the adapter's loss) on `device` replicated. Each rank then holds 1/N of the layers plus
    one gathered layer at a time. The base runs under no_grad (its forward) or with frozen weights (the LM head the
    draft logits go through), so FSDP never reduces gradients. Every rank must run the same base forwards (the
    trainer does; evaluation runs on all ranks when the base is sharded). Returns base."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    info = current()
    device = torch.device(device)
    layers = decoder_layers(base)
    if not info.enabled:
        return base.to(device)
    holder = base.get_decoder()
    # Move everything but the layers first: a base too large for one device must never be on it whole.
    holder.layers = torch.nn.ModuleList()
    try:
        base.to(device)
    finally:
        holder.layers = layers
    mesh = init_device_mesh(device.type, (info.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)  # moves this rank's shard to the mesh's device
    return base


def is_sharded(base) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in base.modules())
