"""Llama 3 family (Llama 3.1 8B/70B/405B, Llama 3.2 1B/3B and a debug flavor)."""

from torchtitan_like.models import ModelSpec, register_model_spec
from torchtitan_like.models.llama3.args import FLAVOR_ALIASES, LLAMA3_FLAVORS, Llama3Args, get_flavor
from torchtitan_like.models.llama3.model import Transformer
from torchtitan_like.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan_like.models.llama3.parallelize import parallelize_llama
from torchtitan_like.models.llama3.pipeline import pipeline_llama

__all__ = ["Llama3Args", "Transformer", "LLAMA3_FLAVORS", "get_flavor"]

register_model_spec(ModelSpec(
    name="llama3",
    model_cls=Transformer,
    flavors=LLAMA3_FLAVORS,
    get_flavor=get_flavor,
    flavor_aliases=FLAVOR_ALIASES,
    state_dict_adapter=Llama3StateDictAdapter,
    parallelize_fn=parallelize_llama,
    pipelining_fn=pipeline_llama,
))
