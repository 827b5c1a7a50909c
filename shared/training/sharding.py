"""Sharded training (`--fsdp`): PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) applied directly.

Why not Accelerate's FSDP plugin: Accelerate (1.15) enables FSDP only on GPU launches; on CPU it falls
back to plain data parallelism without a word, so nothing could be tested here. `fully_shard` itself
runs on any process group (gloo on CPU, NCCL on GPU), and the session uses it in both cases: one path.

- **Units** (`shard_model`): every element of an `nn.ModuleList` (the blocks of a transformer, the
  layers of a PixelCNN, a VQ-VAE's residual blocks) is one FSDP unit, gathered for its forward and
  freed after; the rest of the model is the root unit, which stays gathered from its forward through
  its backward (FSDP2's rule for the root), so a loss may read the root's parameters (VQGAN's adaptive
  weight reads the decoder's last layer).
- **Buffers** are not sharded: every process keeps them, and they stay equal because the EMA codebook
  all-reduces its statistics itself (the session reports the largest difference between processes).
- **Outside training** (validation, sample grids, saving) the model is gathered whole on every process
  (`gathered`), since those call methods other than `forward`.
- **Checkpoints** are torch distributed checkpoints (each process writes its shards; `.metadata` names
  them) beside Accelerate's RNG states; the saved model is the full state dict, gathered to the main
  process (`full_state_dict`).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from shared.config import read_json, write_json_atomic
from shared.errors import UserError

PARAM_DTYPES = {"no": None, "bf16": torch.bfloat16}
SHARDED_RECORD = "sharded.json"  # in a sharded checkpoint: which optimizers had state


def shard_model(model: torch.nn.Module, device: torch.device, world_size: int, mixed_precision: str) -> torch.nn.Module:
    """`model` on `device`, sharded in place across the `world_size` processes (see the module docstring).

    Every process must build the same initial weights (the session seeds them alike): `fully_shard` keeps
    each process's own slice of its own tensor and broadcasts nothing."""
    if mixed_precision not in PARAM_DTYPES:
        raise UserError(f"--fsdp trains in float32 or bf16, not {mixed_precision}: pass --mixed-precision bf16 or no")
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    # no model.to(device) first: fully_shard moves each unit to the mesh's device as it shards it, so no
    # device ever holds the whole model at once
    units = [module for container in model.modules() if isinstance(container, torch.nn.ModuleList)
             for module in container if any(True for _ in module.parameters())]
    outermost = [unit for unit in units if not any(other is not unit and _contains(other, unit) for other in units)]
    for unit in outermost:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(models: list[torch.nn.Module]) -> Iterator[None]:
    """Every sharded unit of `models` gathered whole (plain tensors, on every process) for the block, and
    kept so across forwards; sharded again after. Every process must enter it together."""
    units = [module for model in models if is_sharded(model) for module in model.modules()
             if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # inner units free their parameters after forward again; a root keeps them to its backward
            unit.set_reshard_after_forward(all(unit is not model for model in models), recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of the main process ({} on the others). Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _training_state(pairs: list[tuple[torch.nn.Module, torch.optim.Optimizer]], stepped: list[bool]) -> dict[str, Any]:
    """The state dicts of every model, and of the optimizers that have taken a step (`stepped`): asking torch
    for the state of an optimizer that has none makes it take a zero step, which would change the run
    (a discriminator checkpointed before it starts, say)."""
    state = {}
    for index, ((model, optimizer), has_state) in enumerate(zip(pairs, stepped)):
        if has_state:
            state[f"model_{index}"], state[f"optimizer_{index}"] = get_state_dict(model, optimizer)
        else:
            state[f"model_{index}"] = get_model_state_dict(model)
    return state


def save_sharded(pairs: list[tuple[torch.nn.Module, torch.optim.Optimizer]], folder: Path, is_main: bool) -> None:
    """Each process writes its shards of every (model, optimizer) into `folder` (torch distributed checkpoint);
    the main process records which optimizers had state (SHARDED_RECORD)."""
    stepped = [bool(optimizer.state) for _, optimizer in pairs]
    dcp.save(_training_state(pairs, stepped), checkpoint_id=str(folder))
    if is_main:
        write_json_atomic(folder / SHARDED_RECORD, {"optimizers_with_state": stepped})


def load_sharded(pairs: list[tuple[torch.nn.Module, torch.optim.Optimizer]], folder: Path) -> None:
    """Load what `save_sharded` wrote into the (sharded) models and optimizers, in place."""
    stepped = read_json(folder / SHARDED_RECORD)["optimizers_with_state"]
    state = _training_state(pairs, stepped)
    dcp.load(state, checkpoint_id=str(folder))
    for index, ((model, optimizer), has_state) in enumerate(zip(pairs, stepped)):
        if has_state:
            set_state_dict(model, optimizer, model_state_dict=state[f"model_{index}"],
                           optim_state_dict=state[f"optimizer_{index}"])
        else:
            set_model_state_dict(model, state[f"model_{index}"])


class Sharding:
    """The sharded (model, optimizer) pairs of one run, and what the session does with them."""

    def __init__(self, device: torch.device, world_size: int, mixed_precision: str, is_main: bool) -> None:
        if world_size < 2:
            raise UserError("--fsdp shards the model across processes, and this run has one: launch it with "
                            "torchrun --nproc_per_node N (or accelerate launch), or drop --fsdp")
        self.device, self.world_size, self.mixed_precision, self.is_main = device, world_size, mixed_precision, is_main
        self.pairs: list[tuple[torch.nn.Module, torch.optim.Optimizer]] = []
        self.templates: list[torch.nn.Module | None] = []  # the main process's unsharded copies, on "meta"

    def prepare(self, model: torch.nn.Module, make_optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Shard `model` and build its optimizer (`make_optimizer(parameters)`) over the shards."""
        # An empty copy of the unsharded model: `saving` fills it with the gathered weights to write a folder.
        self.templates.append(copy.deepcopy(model).to("meta") if self.is_main else None)
        model = shard_model(model, self.device, self.world_size, self.mixed_precision)
        optimizer = make_optimizer(model.parameters())
        self.pairs.append((model, optimizer))
        return model, optimizer

    def gathered(self) -> contextlib.AbstractContextManager:
        return gathered([model for model, _ in self.pairs])

    @contextlib.contextmanager
    def accumulating(self, model: torch.nn.Module, syncing: bool) -> Iterator[None]:
        """A micro-batch's backward that reduce-scatters the gradients only when `syncing` (the last one of
        the step); the others accumulate them unsharded on each process, as DDP's no_sync does."""
        model.set_requires_gradient_sync(syncing)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def saving(self) -> Iterator[torch.nn.Module | None]:
        """The main model, unsharded, with its full weights on the main process (None on the others), for
        save_pretrained; emptied again after. Collective."""
        weights = full_state_dict(self.pairs[0][0])
        template = self.templates[0]
        if template is None:
            yield None
            return
        template.load_state_dict(weights, assign=True)
        live = self.pairs[0][0]
        for name, buffer in live.named_buffers():  # non-persistent ones (causal masks) are in no state dict
            owner, _, leaf = name.rpartition(".")
            module = template.get_submodule(owner)
            if module._buffers.get(leaf) is not None and module._buffers[leaf].is_meta:
                module._buffers[leaf] = buffer.detach().to("cpu", copy=True)
        try:
            yield template
        finally:
            template.to("meta")

    def save(self, folder: Path) -> None:
        save_sharded(self.pairs, folder, self.is_main)

    def load(self, folder: Path) -> None:
        load_sharded(self.pairs, folder)
