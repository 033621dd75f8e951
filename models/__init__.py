"""Model registry: a model name maps to its `ModelSpec` (class, flavors and the hooks that the
trainer, the parallelisms and checkpointing call). Models register themselves on import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torchtitan_like.errors import ConfigError, did_you_mean


@dataclass
class ModelSpec:
    name: str
    model_cls: type
    flavors: dict[str, Any]
    get_flavor: Callable[[str], Any]
    # Hooks later subsystems use; None where not provided yet.
    parallelize_fn: Callable | None = None
    pipelining_fn: Callable | None = None
    state_dict_adapter: type | None = None
    flavor_aliases: dict[str, str] = field(default_factory=dict)

    def args_for(self, flavor: str) -> Any:
        name = self.flavor_aliases.get(flavor, flavor)
        if name not in self.flavors:
            raise ConfigError(f"model.flavor = {flavor!r} is not a flavor of {self.name}"
                              f"{did_you_mean(flavor, self.flavors)}; flavors: {', '.join(self.flavors)}")
        return self.get_flavor(name)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model_spec(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"model.name = {name!r} is not a registered model{did_you_mean(name, _REGISTRY)}; "
                          f"models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


# Built-in models register on import.
from torchtitan_like.models import llama3 as _llama3  # noqa: E402,F401
