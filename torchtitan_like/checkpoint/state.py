"""What a checkpoint holds, as DCP-ready state dicts, and how each part is put back.

- `ModelState`: the model, merged over its parts (one per pipeline stage held by this rank), in
  DTensor-aware form from `get_model_state_dict`, so FSDP/TP layouts reshard on load.
  Split master weights (`training.master_weights = "split"`) are saved as the fp32 values their two
  halves form, so the checkpoint is the same as an fp32 run's, and load back into both halves.
- `OptimizerState`: the optimizer in the flattened form of `get_optimizer_state_dict`
  (`state.<param fqn>.<name>`, `param_groups.<param fqn>.<option>`), keyed by parameter names, not
  by the position of a parameter in the optimizer, so it survives a change of parallel layout.
- `RNGState`, `DataloaderState`, `TrainState`: small per-rank or global states stored as tensors
  (JSON inside a uint8 tensor where the value is not a tensor), so loading never unpickles them.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchtitan_like import master_weights
from torchtitan_like.data.dataloader import check_loader_state
from torchtitan_like.errors import ConfigError, did_you_mean

BUILTIN_STATES = ("model", "optimizer", "lr_scheduler", "dataloader", "rng")  # extra states add to these


def check_excluded_states(exclude_from_loading: Sequence[str], extra_state_names: Sequence[str]) -> None:
    """ConfigError for a name of `checkpoint.exclude_from_loading` that is no state of the checkpoint
    besides the model; the start-up checks (startup.py) run it with the trainer's extra states."""
    for name in extra_state_names:
        if name in BUILTIN_STATES:
            raise ConfigError(f"extra_states key {name!r} clashes with a built-in checkpoint state "
                              f"({', '.join(BUILTIN_STATES)})")
    known = list(BUILTIN_STATES) + list(extra_state_names)
    for name in exclude_from_loading:
        if name not in known or name == "model":
            raise ConfigError(f"checkpoint.exclude_from_loading: {name!r} is not an excludable state"
                              f"{did_you_mean(name, known)}; states: {', '.join(known[1:])}")


# ---------------------------------------------------------------------------------------- blobs
def _to_json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().flatten().tolist(), "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape)}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json_safe(item) for item in value]}
    if isinstance(value, list):
        return [_to_json_safe(item) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _to_json_safe(item) for key, item in value.items()}
        return {"__items__": [[_to_json_safe(key), _to_json_safe(item)] for key, item in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint blob (only tensors, numbers, "
                    f"strings, bytes, lists, tuples and dicts)")


def _from_json_safe(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json_safe(item) for item in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"])
            return torch.tensor(value["__tensor__"], dtype=dtype).reshape(value["shape"])
        if "__bytes__" in value:
            return base64.b64decode(value["__bytes__"])
        if "__tuple__" in value:
            return tuple(_from_json_safe(item) for item in value["__tuple__"])
        if "__items__" in value:
            return {_from_json_safe(key): _from_json_safe(item) for key, item in value["__items__"]}
        return {key: _from_json_safe(item) for key, item in value.items()}
    return value


def encode_blob(value: Any) -> torch.Tensor:
    """A plain Python state (numbers, strings, lists, dicts, small tensors) as a uint8 JSON tensor."""
    data = json.dumps(_to_json_safe(value), separators=(",", ":")).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_blob(blob: torch.Tensor) -> Any:
    return _from_json_safe(json.loads(bytes(blob.cpu().numpy().tobytes()).decode("utf-8")))


# ---------------------------------------------------------------------------------------- model
class ModelState:
    """The model parts of this rank as one flat state dict (parameter FQNs are unique across parts)."""

    def __init__(self, model_parts: Sequence[nn.Module]):
        self.model_parts = list(model_parts)

    @staticmethod
    def _split_params(part: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The split master weights (master_weights.py) among `state`'s entries, by name: their
        state-dict entry is the bf16 half, the checkpoint holds the fp32 value both halves form."""
        by_storage = {param.data_ptr(): param for param in part.parameters()
                      if master_weights.is_split(param) and param.numel() > 0}
        if not by_storage:
            return {}
        return {name: by_storage[value.data_ptr()] for name, value in state.items()
                if isinstance(value, torch.Tensor) and value.numel() > 0 and value.data_ptr() in by_storage}

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        merged: dict[str, torch.Tensor] = {}
        for part in self.model_parts:
            state = get_model_state_dict(part)
            for name, param in self._split_params(part, state).items():
                state[name] = master_weights.master_value(param)
            merged.update(state)
        if dtype is not None:
            merged = {name: value.to(dtype) if value.is_floating_point() else value for name, value in merged.items()}
        return merged

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        for part in self.model_parts:
            current = get_model_state_dict(part)
            own = {name: state_dict[name] for name in current}
            split_params, remainders = self._split_params(part, current), {}
            for name in split_params:
                own[name], remainders[name] = master_weights.split(own[name])
            set_model_state_dict(part, own, options=StateDictOptions(strict=True))
            for name, param in split_params.items():
                param._master_lo.copy_(remainders[name].to(param.device))


# ------------------------------------------------------------------------------------ optimizer
class OptimizerState:
    """One optimizer over all model parts, or one per part, as a flattened FQN-keyed state dict.

    Several parts are viewed through an `nn.ModuleList`, which prefixes FQNs with the part index;
    the prefix is removed on save and restored on load, so stage boundaries can move between runs.
    """

    _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model_parts: Sequence[nn.Module], optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]):
        parts = list(model_parts)
        self.single_part = len(parts) == 1
        self.module = parts[0] if self.single_part else nn.ModuleList(parts)
        self.optimizers = optimizers
        self._part_of_fqn: dict[str, str] = {}
        if not self.single_part:
            for index, part in enumerate(parts):
                for fqn in get_model_state_dict(part):
                    self._part_of_fqn[fqn] = str(index)

    @staticmethod
    def _split(key: str) -> tuple[str, str, str]:
        """'state.<fqn>.<name>' -> (section, fqn, name); state and option names contain no dot."""
        section, rest = key.split(".", 1)
        fqn, name = rest.rsplit(".", 1)
        return section, fqn, name

    def state_dict(self) -> dict[str, Any]:
        state = get_optimizer_state_dict(self.module, self.optimizers, options=self._OPTIONS)
        if self.single_part:
            return state
        renamed = {}
        for key, value in state.items():
            section, fqn, name = self._split(key)
            renamed[f"{section}.{fqn.split('.', 1)[1]}.{name}"] = value
        return renamed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.single_part:
            renamed = {}
            for key, value in state_dict.items():
                section, fqn, name = self._split(key)
                renamed[f"{section}.{self._part_of_fqn[fqn]}.{fqn}.{name}"] = value
            state_dict = renamed
        set_optimizer_state_dict(self.module, self.optimizers, state_dict, options=self._OPTIONS)


# ----------------------------------------------------------------------------------------- RNG
class RNGState:
    """This rank's random generators: torch CPU, CUDA (when present) and Python's `random`."""

    def __init__(self, rank: int):
        self.key = f"rank_{rank}"

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        own = {"torch_cpu": torch.get_rng_state(), "python": encode_blob(random.getstate())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            own["torch_cuda"] = torch.cuda.get_rng_state()
        return {self.key: own}

    def load_state_dict(self, state_dict: dict[str, dict[str, torch.Tensor]]) -> None:
        own = state_dict[self.key]
        torch.set_rng_state(own["torch_cpu"].to(torch.uint8))
        random.setstate(decode_blob(own["python"]))
        if "torch_cuda" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state(own["torch_cuda"].to(torch.uint8))


# ---------------------------------------------------------------------------------- dataloader
class DataloaderState:
    """The dataloader position of this data-parallel rank, under `dp_rank_<r>` as a JSON blob.

    Ranks of the same data-parallel rank (tensor/pipeline peers) read the same data and write the
    same key, which DCP stores once. Every rank's state holds the global position in the epoch (all
    ranks together), so a rank whose key is missing (the data-parallel degree grew) loads another
    rank's state and its sampler derives its own position from it (data/sampler.py).
    """

    KEY_PREFIX = "dp_rank_"

    def __init__(self, dataloader: Any, dp_rank: int):
        self.dataloader = dataloader
        self.key = f"{self.KEY_PREFIX}{dp_rank}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self.key: encode_blob(self.dataloader.state_dict())}

    def source_key(self, saved_keys: Iterable[str]) -> str | None:
        """The saved key to load: this rank's own, else the lowest data-parallel rank's; None if none."""
        saved_keys = list(saved_keys)
        if self.key in saved_keys:
            return self.key
        ranks = sorted(int(key[len(self.KEY_PREFIX):]) for key in saved_keys
                       if key.startswith(self.KEY_PREFIX) and key[len(self.KEY_PREFIX):].isdigit())
        return f"{self.KEY_PREFIX}{ranks[0]}" if ranks else None

    def load_template(self, saved_keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The DCP load template for a checkpoint whose dataloader keys are `saved_keys`: the blob of
        `source_key` (a placeholder; the loader sizes it after the checkpoint), or {} if none."""
        key = self.source_key(saved_keys)
        return {} if key is None else {key: torch.empty(0, dtype=torch.uint8)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        key = self.source_key(state_dict)
        if key is None:
            raise KeyError(f"no {self.KEY_PREFIX}<r> dataloader state among {sorted(state_dict)}")
        state = decode_blob(state_dict[key])
        check_loader_state(self.dataloader, state)
        self.dataloader.load_state_dict(state)


# --------------------------------------------------------------------------------- train state
# The key under which the trainer passes its TrainState in `extra_states` (and which
# `checkpoint.exclude_from_loading` may name).
TRAIN_STATE_KEY = "train_state"


class TrainState:
    """Step counter, tokens seen and per-step losses: pass it in `extra_states[TRAIN_STATE_KEY]`."""

    def __init__(self, step: int = 0, tokens_seen: int = 0, losses: list[float] | None = None):
        self.step, self.tokens_seen = step, tokens_seen
        self.losses: list[float] = list(losses or [])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64),
                "tokens_seen": torch.tensor(self.tokens_seen, dtype=torch.int64),
                "losses": torch.tensor(self.losses, dtype=torch.float64)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])
        self.losses = [float(value) for value in state_dict["losses"].tolist()]
