"""Does a checkpoint fit the run that loads it? Checked from the checkpoint's metadata before any
tensor is read, so that a mismatch is one clear UserError (exit 2) on every rank, not a traceback
from inside DCP or, worse, a silent partial load."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from torchtitan_like.errors import UserError


def check_model_shapes(model_state: dict[str, torch.Tensor | tuple[int, ...]], metadata: Metadata, checkpoint_path: str,
                       prefix: str = "model.") -> None:
    """UserError naming every model tensor that is missing from the checkpoint or has another shape,
    and every model tensor of the checkpoint that the model lacks (e.g. more layers). `model_state`
    is the whole model (under pipeline parallel: every stage's, see `global_model_shapes`)."""
    saved = metadata.state_dict_metadata
    missing, mismatched = [], []
    for name, value in model_state.items():
        entry, shape = saved.get(prefix + name), tuple(getattr(value, "shape", value))
        if not isinstance(entry, TensorStorageMetadata):
            missing.append(name)
        elif tuple(entry.size) != shape:
            mismatched.append(f"{name}: checkpoint {tuple(entry.size)} vs model {shape}")
    unexpected = sorted(key[len(prefix):] for key in saved
                        if key.startswith(prefix) and key[len(prefix):] not in model_state)
    if not missing and not mismatched and not unexpected:
        return
    lines = [f"checkpoint {checkpoint_path} does not fit the model (different model config or flavor?)"]
    if mismatched:
        lines.append(f"{len(mismatched)} tensor(s) of another shape:\n  " + "\n  ".join(mismatched[:20]))
    if missing:
        lines.append(f"{len(missing)} tensor(s) missing from the checkpoint: " + ", ".join(missing[:20]))
    if unexpected:
        lines.append(f"{len(unexpected)} tensor(s) of the checkpoint not in the model: " + ", ".join(unexpected[:20]))
    raise UserError("\n".join(lines))


def global_model_shapes(model_state: dict[str, torch.Tensor], group=None) -> dict[str, tuple[int, ...]]:
    """The (global) shape of every model tensor held by any rank: under pipeline parallel a rank
    holds only its stages, and every rank must judge the whole model alike (and raise alike)."""
    shapes = {name: tuple(value.shape) for name, value in model_state.items()}
    return {name: shape for rank_shapes in _from_every_rank(shapes, group) for name, shape in rank_shapes.items()}


def _from_every_rank(value: Any, group=None) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; [value] without a multi-process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def saved_keys(metadata: Metadata, state: str) -> list[str]:
    """The keys the checkpoint holds under top-level `state` (e.g. `dp_rank_0` of "dataloader")."""
    prefix = state + "."
    return [fqn[len(prefix):] for fqn in metadata.state_dict_metadata if fqn.startswith(prefix)]


def fit_to_checkpoint(template: dict, metadata: Metadata, prefix: str, what: str) -> dict:
    """Size plain tensors of a load template after the checkpoint (blobs and loss histories vary in
    length) and drop entries the checkpoint lacks (e.g. the RNG state of a rank that did not exist)."""
    fitted = {}
    for key, value in template.items():
        fqn = f"{prefix}.{key}"
        if isinstance(value, dict):
            if value and not any(saved.startswith(fqn + ".") for saved in metadata.state_dict_metadata):
                warnings.warn(f"checkpoint has no {fqn}: {what} keeps its current value", stacklevel=3)
                continue
            fitted[key] = fit_to_checkpoint(value, metadata, fqn, what)
            continue
        entry = metadata.state_dict_metadata.get(fqn)
        if entry is None:
            warnings.warn(f"checkpoint has no {fqn}: {what} keeps its current value", stacklevel=3)
            continue
        if isinstance(value, torch.Tensor) and isinstance(entry, TensorStorageMetadata) and not hasattr(value, "placements"):
            if tuple(value.shape) != tuple(entry.size) or value.dtype != entry.properties.dtype:
                value = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        fitted[key] = value
    return fitted


def optimizer_parameter_names(optimizer_state: dict, prefix: str) -> set[str]:
    """The parameter names of a flattened optimizer state dict (`<prefix><param fqn>.<state>` keys,
    e.g. `state.output.weight.exp_avg`): the parameters it holds moments for."""
    return {key[len(prefix):].rsplit(".", 1)[0] for key in optimizer_state if key.startswith(prefix)}


def global_names(names: set[str], group=None) -> set[str]:
    """The union of every rank's `names` (under pipeline parallel a rank optimizes only its stages)."""
    return {name for rank_names in _from_every_rank(sorted(names), group) for name in rank_names}


def check_optimizer_parameters(expected: set[str], metadata: Metadata, checkpoint_path: str) -> None:
    """UserError when the checkpoint's optimizer holds moments for another set of parameters than the
    run's optimizer. The model's tensors can all match while the parameters differ: a tied flavor
    (`debugmodel_tied`, Llama 3.2 1B/3B) shares one Parameter between `tok_embeddings.weight` and
    `output.weight`, yet its state dict holds both names. Loading an untied run's checkpoint there
    would silently put two matrices into one parameter; the reverse failed inside DCP."""
    saved = optimizer_parameter_names(metadata.state_dict_metadata, "optimizer.state.")
    if not saved:  # a checkpoint without optimizer moments (none taken yet): nothing to compare
        return
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if not missing and not unexpected:
        return
    lines = [f"checkpoint {checkpoint_path} holds optimizer state for other parameters than this run's "
             "(a tied-embedding flavor against an untied one, or another model config?)"]
    if missing:
        lines.append(f"parameters with no optimizer state in the checkpoint: {', '.join(missing[:20])}")
    if unexpected:
        lines.append(f"optimizer state for parameters this run does not have: {', '.join(unexpected[:20])}")
    lines.append('use the flavor the checkpoint was trained with, or add "optimizer" to '
                 "checkpoint.exclude_from_loading to start the optimizer afresh")
    raise UserError("\n".join(lines))


TIED_PAIR = ("tok_embeddings.weight", "output.weight")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def untie_for_loading(model_state: dict[str, torch.Tensor]) -> bool:
    """For a model whose LM head is its embedding (one tensor under both names), load the
    checkpoint's `output.weight` into a buffer of its own, so `check_tied_weights_loaded` can see
    whether the checkpoint tied them too. Returns whether it did."""
    embedding, head = (model_state.get(name) for name in TIED_PAIR)
    if embedding is None or head is None or _local(embedding).data_ptr() != _local(head).data_ptr():
        return False
    model_state[TIED_PAIR[1]] = torch.empty_like(head)
    return True


def check_tied_weights_loaded(model_state: dict[str, torch.Tensor], checkpoint_path: str, group=None) -> None:
    """UserError on every rank when the loaded embedding and LM head differ: the checkpoint was
    trained untied, and a tied model would silently keep one of the two matrices."""
    embedding, head = (_local(model_state[name]) for name in TIED_PAIR)
    differs = torch.tensor([0.0 if torch.equal(embedding, head) else 1.0])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        differs = differs.to(embedding.device)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)
    if differs.item():
        raise UserError(f"checkpoint {checkpoint_path} was trained with an untied LM head (output.weight differs "
                        "from tok_embeddings.weight), but this run's model ties them: use the untied flavor")
