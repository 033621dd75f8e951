"""Reading DCP checkpoints without unpickling arbitrary objects.

DCP's stock reader unpickles `.metadata` with `pickle.load` and non-tensor entries ("bytes" items, e.g.
the optimizer's `param_groups`) with `torch.load(weights_only=False)`: a crafted checkpoint could run
code on load. Here metadata goes through an unpickler that only admits DCP's own metadata classes and
a few plain types, and bytes items go through `torch.load(weights_only=True)` (tensors, numbers,
strings, lists, dicts). Tensor payloads are already read with `weights_only=True` by DCP.
"""

from __future__ import annotations

import io
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from torchtitan_like.errors import DataError

METADATA_FILE = ".metadata"

# Modules whose classes may appear in DCP metadata (all plain dataclasses / enums describing
# tensor shapes, chunks and file offsets), plus the builtins and torch types they reference.
_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("pathlib", "PosixPath"),
    ("enum", "Enum"), ("copyreg", "_reconstructor"), ("builtins", "object"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                              torch.memory_format))
        if is_dtype or (module, name) in _ALLOWED_GLOBALS or module.startswith(_ALLOWED_MODULE_PREFIXES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not allowed")


def read_metadata(checkpoint_path: str) -> Metadata:
    """The DCP metadata of a checkpoint folder, read with the restricted unpickler.

    Raises DataError when the file is missing, truncated or references a disallowed type.
    """
    path = os.path.join(checkpoint_path, METADATA_FILE)
    try:
        with open(path, "rb") as metadata_file:
            metadata = _MetadataUnpickler(metadata_file).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as error:
        raise DataError(f"checkpoint {checkpoint_path}: cannot read DCP metadata ({METADATA_FILE}): {error}") from error
    if not isinstance(metadata, Metadata):
        raise DataError(f"checkpoint {checkpoint_path}: {METADATA_FILE} does not hold DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files are not used by this project
            return super().read_metadata(*args, **kwargs)
        metadata = read_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor entries with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        value.seek(0)
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
