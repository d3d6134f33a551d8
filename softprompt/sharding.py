"""The frozen base sharded over processes with FSDP2; the prompt replicated on every process.

Under `accelerate launch` with an FSDP config, `shard_base` splits every weight of the base over the
processes with torch's `fully_shard` (FSDP2): a process keeps 1/N of each weight and all-gathers a
group of weights just before the group's forward (and backward), then frees the gathered copy. The
groups follow accelerate's `fsdp2_prepare_model`: one per transformer block (the model's
`_no_split_modules`, or the launch's `--fsdp_transformer_layer_cls_to_wrap`), the input embedding
alone, the tail (final norm and output head, with the input embedding where the two are tied),
and the rest (positions, norms) at the root. The encoder of an encoder-decoder is a group too: the
seq2seq family runs it on its own before the model's forward.

The prompt is never sharded: it is tiny, and every forward needs all of it. `replicate` gives every
process the first process's parameters, and `average_gradients` all-reduces the gradients once per
optimizer step; plain data-parallel launches use the same two calls, so all processes take the same
optimizer steps on the same prompt.

Every process must run the same forwards in the same order, since each one gathers weights with
collective calls: training runs one micro-batch per process and step, evaluation the same rows on
every process.
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def sharding_requested(accelerator) -> bool:
    """Whether the launch asks for FSDP: accelerate says so (GPU launches), or its launcher's environment does (CPU
    launches, which accelerate runs as plain multi-process ones)."""
    from accelerate.utils import DistributedType

    return (
        getattr(accelerator, "distributed_type", None) == DistributedType.FSDP
        or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    )


def launch_options(accelerator) -> dict:
    """`shard_base`'s options from the launch's FSDP plugin (its config file or `--fsdp_*` flags)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if getattr(accelerator, "distributed_type", None) == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    else:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` sets
    reshard = plugin.reshard_after_forward
    if not isinstance(reshard, bool):  # an FSDP1 sharding strategy: only SHARD_GRAD_OP keeps weights after forward
        reshard = getattr(reshard, "name", str(reshard)).upper() != "SHARD_GRAD_OP"
    layers = plugin.transformer_cls_names_to_wrap
    if isinstance(layers, str):
        layers = [n.strip() for n in layers.split(",") if n.strip()]
    return {"reshard_after_forward": reshard, "cpu_offload": bool(plugin.cpu_offload), "layer_classes": layers or None}


def shard_base(
    base,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    layer_classes: list[str] | None = None,
):
    """Shard `base`'s weights over the processes of the default process group with FSDP2, in place; returns `base`.

    A base already sharded is left as it is. Must be called on every process (it runs one forward).
    reshard_after_forward: free a block's gathered weights after its forward (gather again for backward);
        False keeps them until backward, trading memory for one gather less.
    cpu_offload: keep the shards in CPU memory between uses (CUDA only; on CPU they are there already).
    layer_classes: class names of the blocks to shard one by one (default: the model's `_no_split_modules`).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    model = base.model
    if isinstance(model, FSDPModule):
        return base
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(
            "Sharding the base model (FSDP) needs the processes of a distributed launch, and none was started.",
            "launch with `accelerate launch --use_fsdp --fsdp_version 2 --num_processes N -m softprompt train ...`.",
        )
    if getattr(model, "hf_device_map", None) or base.quantization:
        raise ConfigError(
            "The base model is placed with --device-map or quantized, which FSDP sharding does not combine with.",
            "drop --device-map and --quantize under an FSDP launch (sharding already splits the weights).",
        )
    options = {"reshard_after_forward": reshard_after_forward}
    if cpu_offload and base.device.type != "cpu":
        options["offload_policy"] = CPUOffloadPolicy()
    # embedding and tail first: a block group below then leaves out the weights they hold (BERT's embeddings block)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    if not tied:
        fully_shard(_with_tied(model, [embed]), **options)
    tail = [m for m in (_final_norm(model), *((embed, head) if tied else (head,))) if m is not None]
    if tail:  # used at the end of forward and first in backward: kept gathered in between
        fully_shard(_with_tied(model, tail), **{**options, "reshard_after_forward": False})
    names = set(layer_classes or getattr(model, "_no_split_modules", None) or [])
    for module in reversed(list(model.modules())):  # bottom up: nested blocks before the blocks holding them
        if type(module).__name__ in names and module is not model and not isinstance(module, FSDPModule):
            fully_shard(module, **options)
    if model.config.is_encoder_decoder:
        fully_shard(model.get_encoder(), **options)
    fully_shard(model, **{k: v for k, v in options.items() if k != "reshard_after_forward"})  # root: torch's default
    base.family.forward_whole()  # before the families run the embedding alone: the model becomes the root
    reshard(base)
    return base


def _with_tied(model, modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """`modules` and every other module that holds one of their weights (a weight is in one FSDP group only): T5's
    encoder and decoder token embeddings share `shared.weight`, BERT's head its output bias. A module inside another
    of the group goes with it."""
    holders: dict[int, list[torch.nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(m)
    group = list(modules)
    for m in group:  # grows while it is walked: the holders of the holders' weights join too
        for p in m.parameters():
            group += [h for h in holders.get(id(p), []) if all(h is not g for g in group)]
    names = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    outer = {n for m in group for n in names.get(id(m), [])}
    return [m for m in group if not any(n.startswith(o + ".") for n in names.get(id(m), []) for o in outer if o)]


def _final_norm(model) -> torch.nn.Module | None:
    """The norm before the output head: by convention the base model's last direct child with Norm in its class
    name (`model.norm` of Llama, `transformer.ln_f` of GPT-2), as accelerate finds it."""
    inner = getattr(model, getattr(model, "base_model_prefix", ""), model)
    norms = [m for m in inner.children() if "Norm" in type(m).__name__]
    return norms[-1] if norms else None


def reshard(base) -> None:
    """Free every gathered weight of a sharded base (groups that keep theirs after forward hold them until the next
    backward): afterwards each process holds its shards only, `Base.local_bytes()`."""
    from torch.distributed.fsdp import FSDPModule

    for module in base.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# --- the prompt, replicated ----------------------------------------------------------------------------------------


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def replicate(module: torch.nn.Module) -> None:
    """Give every process the first process's parameters and buffers of `module` (one broadcast)."""
    import torch.distributed as dist

    if _world() == 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.numel()]
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the processes (one all-reduce of the flattened gradients).

    A parameter without a gradient counts as zero where another process has one, and keeps none where no process
    has one (as one process would: the optimizer then skips it).
    """
    import torch.distributed as dist

    world = _world()
    if world == 1 or not params:
        return
    like = params[0]
    parts = [
        p.grad.reshape(-1).float() if p.grad is not None else like.new_zeros(p.numel(), dtype=torch.float)
        for p in params
    ]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float, device=like.device)
    flat = torch.cat([*parts, has])
    dist.all_reduce(flat)
    grads, seen = flat[: -len(params)], flat[-len(params) :]
    for p, g, s in zip(params, grads.split([p.numel() for p in params]), seen.tolist()):
        p.grad = (g / world).view_as(p).to(p.dtype) if s else None
