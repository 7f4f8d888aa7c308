"""What the trainer needs to know about sharded parameters (FSDP2 through Accelerate's FSDP plugin).

Under FSDP2 each trained parameter is a DTensor: every process holds a slice of it and of its gradient.
The trainer reads parameters and gradients in five places, and each needs the whole vector, not the
slice: the gradient norm, UNGrad's two inner products, the digest that checks every process ended with
the same weights, the checkpoint and the final delta. The helpers below give those whole quantities;
on plain tensors they do nothing, so a run without FSDP takes exactly the path it took before.

- Sums over the trained subset (norms, inner products) are computed on each process's slice and
  summed over the processes: no gradient is gathered.
- Weights are gathered (`full_tensor`) only to be written, and the trained subset is small (LoRA,
  the attention projections); every process takes part in the gather, the main one writes.

Why by hand: Accelerate clips sharded gradients (`clip_grad_norm_`), but the toolkit's own reads of
gradients and weights are its own; torch's DTensor gives the pieces (`to_local`, `full_tensor`,
`distribute_tensor`). The optimizer's state is gathered by name here (torch.distributed.checkpoint's
helper failed on it: `optimizer_state`).
"""

from __future__ import annotations

import torch

from concept_erase.errors import UserError


def is_sharded(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor
        return False
    return isinstance(t, DTensor)


def any_sharded(tensors) -> bool:
    return any(is_sharded(t) for t in tensors if t is not None)


def local(t):
    """This process's slice of a sharded tensor; a plain tensor itself."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective: every process must call it in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def sum_over_processes(values: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Partial sums from each process's slices -> the sums over the whole vectors."""
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


def distribute_like(whole: torch.Tensor, like: torch.Tensor):
    """A whole tensor sharded as the sharded `like` is (a collective); `.to_local()` is this process's slice."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements)


def whole_state(trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: whole fp32 CPU copy} of the trained weights (gathered where sharded; every process calls)."""
    return {n: full(p.detach()).float().cpu().contiguous() for n, p in trained.items()}


def load_whole(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole tensor into a parameter, each process taking its own slice where it is sharded."""
    with torch.no_grad():
        if is_sharded(p):
            p.to_local().copy_(distribute_like(value.to(p.dtype), p).to_local())
        else:
            p.copy_(value.to(p.device, p.dtype))


def optimizer_state(trained: dict[str, torch.Tensor], optimizer, sharded: bool) -> dict:
    """The optimizer's state, whole. Unsharded: the optimizer's own state_dict. Sharded: per trained
    parameter name, each state tensor gathered whole (every process calls, in the same order), and the
    groups' settings. (torch.distributed.checkpoint's get_optimizer_state_dict failed with a KeyError on a
    run whose optimizer held no state yet for some parameters: a subset with parameters that get no
    gradient.)"""
    if not sharded:
        return optimizer.state_dict()
    names = {id(p): n for n, p in trained.items()}
    state = {}
    for n, p in trained.items():
        held = optimizer.state.get(p, {})
        state[n] = {k: (full(v).detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in sorted(held.items())}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"by_name": True, "state": state, "param_groups": groups}


def load_optimizer_state(trained: dict[str, torch.Tensor], optimizer, state: dict, sharded: bool) -> None:
    if bool(state.get("by_name")) != sharded:  # the two forms: by parameter name (sharded), torch's own (not)
        raise UserError("this checkpoint was written by a " + ("sharded (FSDP) run; resume it under the same "
                        "accelerate config (accelerate launch --config_file pipelines/accelerate-fsdp-*.yaml ...)"
                        if state.get("by_name") else "run without FSDP; resume it without the FSDP accelerate config"))
    if not sharded:
        optimizer.load_state_dict(state)
        return
    for n, p in trained.items():
        held = {}
        for k, v in state["state"].get(n, {}).items():
            if torch.is_tensor(v) and is_sharded(p) and v.shape == p.shape:
                v = distribute_like(v, p)
            elif torch.is_tensor(v) and v.dim() > 0:
                v = v.to(p.device)
            held[k] = v
        if held:
            optimizer.state[p] = held
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


def init_fsdp_while_trainable(model) -> None:
    """FSDP2 fixes each shard group's gradient precision at its first forward, from the parameters that
    require gradients then. The first forward of a LoRA run is the original model's, with the adapter
    off, and PEFT switches the adapter off by clearing its requires_grad: the groups then fixed no
    gradient precision, and the first backward failed ("attempting to assign a gradient with dtype
    BFloat16 to a tensor with grad_dtype Float", pytorch/pytorch#186998; seen on an H200, torch 2.11).
    Initialising FSDP's state now, while the trained parameters require gradients, fixes it."""
    state = getattr(model, "_get_fsdp_state", None)
    if state is not None:
        state()._lazy_init()
