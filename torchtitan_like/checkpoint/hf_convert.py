"""Convert between Hugging Face Llama folders and our DCP checkpoints.

    python -m torchtitan_like.checkpoint.hf_convert import --hf HF_FOLDER --output CKPT_FOLDER
    python -m torchtitan_like.checkpoint.hf_convert export --checkpoint CKPT_FOLDER \
        (--config TRAIN.toml [--section.key value ...] | --flavor NAME) --output HF_FOLDER [--dtype bfloat16]

`import` reads `config.json` and the `*.safetensors` weights (sharded through
`model.safetensors.index.json` too) and writes a model-only DCP checkpoint `CKPT_FOLDER/step-0` that
`checkpoint.initial_load_path` can point to. `export` reads the newest complete checkpoint under
CKPT_FOLDER (or the step folder given), takes the architecture from the training config or flavor
(the vocabulary size from the checkpoint itself), and writes `config.json` plus `model.safetensors`
(several shards and an index above `--max-shard-bytes`). Runs on one process, on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan_like.checkpoint import folders
from torchtitan_like.checkpoint.fit import check_model_shapes
from torchtitan_like.checkpoint.manager import EXPORT_DTYPES
from torchtitan_like.checkpoint.safe_storage import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from torchtitan_like.checkpoint.writing import save_model_only
from torchtitan_like.errors import USER_ERROR_EXIT_CODE, ConfigError, DataError, StorageError, UserError
from torchtitan_like.filesystem import find_os_error, storage_error, write_text_atomically
from torchtitan_like.models import get_model_spec

SAFETENSORS_INDEX = "model.safetensors.index.json"
IMPORTED_CONFIG = "hf_import_config.json"  # written by `import` beside the step folder


def _meta_model_state(model_name: str, args) -> dict[str, torch.Tensor]:
    """Shapes of the model these args build (meta device: no memory)."""
    spec = get_model_spec(model_name)
    with torch.device("meta"):
        return spec.model_cls(args).state_dict()


def read_dcp_model(checkpoint_path: str) -> tuple[folders.CheckpointFolder, dict[str, torch.Tensor]]:
    """The full (unsharded) model tensors of a checkpoint, read on this one process."""
    folder = folders.resolve_checkpoint(checkpoint_path)
    metadata = read_metadata(folder.path)
    prefix = "model."
    state = {key[len(prefix):]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
             for key, entry in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    if not state:
        raise DataError(f"checkpoint {folder.path} holds no model tensors")
    loaded = {"model": state}
    dcp.load(loaded, storage_reader=SafeFileSystemReader(folder.path), planner=SafeLoadPlanner(), no_dist=True)
    return folder, loaded["model"]


def check_tied_embeddings(state: dict[str, torch.Tensor], args, checkpoint_path: str) -> None:
    """DataError when the architecture ties the LM head to the embedding but the checkpoint holds two
    different matrices (trained untied, e.g. exported or sampled with the tied flavor by mistake):
    the shapes fit, and one of the two would silently be dropped."""
    if not getattr(args, "tie_word_embeddings", False):
        return
    embedding, head = state.get("tok_embeddings.weight"), state.get("output.weight")
    if embedding is not None and head is not None and not torch.equal(embedding, head):
        raise DataError(f"checkpoint {checkpoint_path} was trained with an untied LM head (output.weight differs "
                        f"from tok_embeddings.weight), but the configured model ties them: choose the untied flavor")


def write_dcp_model(state: dict[str, torch.Tensor], output_root: str, step: int = 0) -> str:
    """A model-only complete checkpoint `output_root/step-<step>` written from this process (a failed
    write leaves no `.tmp` behind and raises a StorageError)."""
    return save_model_only(state, output_root, step, "writing the imported checkpoint")


def _safetensors():
    """The safetensors module (an optional dependency: the `hf` extra), or a UserError saying so."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ConfigError("Hugging Face conversion reads and writes safetensors, which is not installed: "
                          "pip install safetensors (or this package's [hf] extra)") from None
    return safetensors


def _read_safetensors(hf_folder: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name, the file each came from)."""
    safetensors = _safetensors()
    index_path = os.path.join(hf_folder, SAFETENSORS_INDEX)
    # transformers' order: a model.safetensors beside an index wins, so both read the same weights.
    if os.path.isfile(os.path.join(hf_folder, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.isfile(index_path):
        try:
            with open(index_path) as index_file:
                files = sorted(set(json.load(index_file)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{index_path}: not a safetensors index (expected JSON with a \"weight_map\" of "
                            f"tensor name -> shard file; {type(error).__name__}: {error})") from None
    else:
        files = sorted(name for name in os.listdir(hf_folder) if name.endswith(".safetensors"))
    if not files:
        raise DataError(f"{hf_folder}: no model.safetensors, {SAFETENSORS_INDEX} or *.safetensors files "
                        f"(PyTorch .bin weights are not read: they need unpickling)")
    state, source = {}, {}
    for name in files:
        path = os.path.join(hf_folder, name)
        if not os.path.isfile(path):
            raise DataError(f"{hf_folder}: shard {name} listed in {SAFETENSORS_INDEX} is missing")
        try:
            tensors = safetensors.torch.load_file(path)
        except safetensors.SafetensorError as error:
            raise DataError(f"{path}: not a readable safetensors file ({error}); an interrupted download?") from None
        for key, value in tensors.items():
            if key in source:
                raise DataError(f"{hf_folder}: tensor {key} is in both {source[key]} and {name}")
            state[key], source[key] = value, name
    return state, source


def import_hf(hf_folder: str, output_root: str, model_name: str = "llama3") -> str:
    config_path = os.path.join(hf_folder, "config.json")
    if not os.path.isfile(config_path):
        raise DataError(f"{hf_folder}: no config.json (expected a Hugging Face model folder)")
    with open(config_path) as config_file:
        try:
            hf_config = json.load(config_file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(hf_config, dict):
        raise DataError(f"{config_path}: expected a JSON object of model settings, got {type(hf_config).__name__}")
    spec = get_model_spec(model_name)
    # The adapter's module holds the config helpers (`hf_config`, `args_from_hf_config`) next to it.
    try:
        args = _adapter_module(model_name).args_from_hf_config(hf_config)
    except KeyError as error:
        raise DataError(f"{config_path}: missing setting {error} (expected a Hugging Face model config)") from None
    adapter = spec.state_dict_adapter(args)
    _refuse_a_training_folder(output_root)
    hf_state, source = _read_safetensors(hf_folder)
    # Checked under the Hugging Face names, before the q/k permutation reshapes anything, so that
    # each message names a key the user can find in the files.
    expected = adapter.to_hf(_meta_model_state(model_name, args))
    ignored = {name for name in hf_state if name.endswith("rotary_emb.inv_freq")}  # a recomputed buffer
    if args.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied exports store it too; the embedding is used
    unexpected = sorted(set(hf_state) - set(expected) - ignored)
    if unexpected:
        raise DataError(f"{hf_folder}: weights not in the model built from config.json: "
                        + ", ".join(f"{name} (in {source[name]})" for name in unexpected[:20]))
    for name, meta in expected.items():
        if name not in hf_state:
            raise DataError(f"{hf_folder}: weight {name} is missing (config.json implies it)")
        if tuple(hf_state[name].shape) != tuple(meta.shape):
            raise DataError(f"{hf_folder}: {name} (in {source[name]}) has shape {tuple(hf_state[name].shape)}, "
                            f"config.json implies {tuple(meta.shape)}")
    state = adapter.from_hf(hf_state)
    state = {name: value.to(torch.float32).contiguous() for name, value in state.items()}
    if args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    _ensure_output_writable(output_root)
    path = write_dcp_model(state, output_root)
    # Kept beside the weights: the trainer checks that the flavor it builds has this architecture
    # (the weights alone cannot tell a different RoPE base or scaling).
    config_path = os.path.join(output_root, IMPORTED_CONFIG)
    try:
        write_text_atomically(config_path, json.dumps({"model": model_name, "config": hf_config}, indent=2))
    except OSError as error:
        shutil.rmtree(path, ignore_errors=True)  # weights without their architecture would load unchecked
        raise storage_error("writing the imported checkpoint", config_path, error,
                            f"The imported weights {path} were removed") from error
    return path


# Architecture fields that change the logits of the same weights (shapes are checked at load).
_ARCHITECTURE_FIELDS = ("rope_theta", "rope_scaling", "norm_eps", "tie_word_embeddings")


def check_imported_architecture(checkpoint_path: str, model_name: str, model_args) -> None:
    """ConfigError when `checkpoint_path` (a root or a step folder) was written by `import` from a
    Hugging Face model whose RoPE or norm settings differ from the model the config builds: the
    weights would load (same shapes) and silently compute other logits. Nothing to check for other
    checkpoints."""
    for folder in (checkpoint_path, os.path.dirname(os.path.normpath(checkpoint_path))):
        path = os.path.join(folder, IMPORTED_CONFIG)
        if os.path.isfile(path):
            break
    else:
        return
    with open(path) as config_file:
        imported = json.load(config_file)
    if imported.get("model", model_name) != model_name:
        raise ConfigError(f"checkpoint {checkpoint_path} was imported as model {imported['model']!r}, but "
                          f"model.name = {model_name!r}")
    imported_args = _adapter_module(model_name).args_from_hf_config(imported["config"])
    differences = [f"{name}: imported {getattr(imported_args, name)!r}, model.flavor gives {getattr(model_args, name)!r}"
                   for name in _ARCHITECTURE_FIELDS if getattr(imported_args, name) != getattr(model_args, name)]
    if differences:
        raise ConfigError(f"checkpoint {checkpoint_path} was imported from a Hugging Face model with another "
                          f"architecture than the configured model.flavor ({'; '.join(differences)}); the weights "
                          f"would load and compute different logits: choose the flavor matching the import")


def _refuse_a_training_folder(output_root: str) -> None:
    """The import is step-0; `initial_load_path` (and `export`) pick a folder's newest step, so beside
    a run's step-N folders the import would be silently passed over. A previous import (step-0
    alone) may be replaced."""
    other_steps = [step for step, _ in folders.step_folders(output_root) if step != 0]
    if other_steps:
        raise ConfigError(f"--output {output_root!r} already holds checkpoints (step-{max(other_steps)}): the "
                          f"import would be step-0 beside them and loading the folder picks the newest step, "
                          f"not the import; choose an empty folder")


def _ensure_output_writable(folder: str) -> None:
    """folders.ensure_writable, with a message naming this command's option, not the trainer's keys."""
    try:
        folders.ensure_writable(folder)
    except StorageError as error:  # writable, but full
        raise storage_error(f"writing to --output {folder!r}", folder, find_os_error(error)) from None
    except ConfigError as error:
        raise ConfigError(f"--output {folder!r} is not a writable folder ({error.__cause__.strerror or error.__cause__})"
                          ) from None


# The weight files an export writes: model.safetensors, or shards and their index.
_EXPORTED_WEIGHTS = re.compile(r"^(model\.safetensors|model-\d+-of-\d+\.safetensors|model\.safetensors\.index\.json)$")


def _remove_previous_weights(folder: str) -> None:
    """Delete the weights of an earlier export into `folder`. Otherwise a re-export with another
    sharding leaves both layouts there, and readers disagree on which to load: transformers takes
    model.safetensors, an index-first reader the old shards."""
    for name in os.listdir(folder):
        if _EXPORTED_WEIGHTS.match(name):
            os.remove(os.path.join(folder, name))


def _adapter_module(model_name: str):
    import importlib

    return importlib.import_module(get_model_spec(model_name).state_dict_adapter.__module__)


def export_hf(checkpoint_path: str, output_folder: str, args, model_name: str = "llama3", dtype: str = "float32",
              max_shard_bytes: int = 5 * 1024**3, bos_id: int | None = None, eos_id: int | None = None,
              given_ids: dict[str, int | None] | None = None) -> list[str]:
    """Write `config.json` and safetensors for the model of a checkpoint; returns the weight files.

    `args` is the model's architecture; a vocab_size <= 0 is taken from the checkpoint. The
    tokenizer's `bos_id` / `eos_id` go into config.json and generation_config.json: without them
    transformers assumes its defaults (1 and 2), and `generate()` would never stop at our EOS.
    `given_ids` ({"--bos-id": id, ...}): ids the user typed, which must lie in the checkpoint's vocabulary.
    """
    _safetensors()  # before any work: a missing optional dependency is a ConfigError
    folder, state = read_dcp_model(checkpoint_path)
    if "tok_embeddings.weight" not in state:
        raise DataError(f"checkpoint {folder.path} has no tok_embeddings.weight: not a Llama checkpoint")
    if args.vocab_size <= 0:
        args.vocab_size = int(state["tok_embeddings.weight"].shape[0])
    check_model_shapes(_meta_model_state(model_name, args), read_metadata(folder.path), folder.path)
    check_tied_embeddings(state, args, folder.path)
    for flag, token_id in (given_ids or {}).items():
        if token_id is not None and not 0 <= token_id < args.vocab_size:
            raise ConfigError(f"{flag} {token_id}: must be a token id in [0, {args.vocab_size - 1}] "
                              f"(the checkpoint's vocabulary)")
    adapter = get_model_spec(model_name).state_dict_adapter(args)
    hf_state = {name: value.to(EXPORT_DTYPES[dtype]).contiguous() for name, value in adapter.to_hf(state).items()}
    _ensure_output_writable(output_folder)
    _remove_previous_weights(output_folder)
    hf_config = _adapter_module(model_name).hf_config(args, dtype)
    token_ids = {key: value for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id))
                 if value is not None}
    hf_config.update(token_ids)
    writing = [output_folder]  # the file being written, for the error message
    try:
        return _write_hf_folder(output_folder, hf_config, token_ids, hf_state, max_shard_bytes, writing)
    except Exception as error:  # safetensors reports a full disk as a SafetensorError, not an OSError
        os_error = find_os_error(error)
        if os_error is None:
            raise
        # Give the space back, and leave no config.json that would present the folder as a model.
        _remove_previous_weights(output_folder)
        for name in ("config.json", "generation_config.json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_folder, name))
        raise storage_error(f"exporting {folder.path}", writing[-1], os_error,
                            f"The files written to {output_folder} were removed") from error


def _write_hf_folder(output_folder: str, hf_config: dict, token_ids: dict, hf_state: dict[str, torch.Tensor],
                     max_shard_bytes: int, writing: list[str]) -> list[str]:
    """The safetensors (shards and an index above `max_shard_bytes`), then generation_config.json and
    config.json; appends each path to `writing` before writing it."""
    save_file = _safetensors().torch.save_file

    def path(name: str) -> str:
        writing.append(os.path.join(output_folder, name))
        return writing[-1]

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, value in hf_state.items():
        size = value.numel() * value.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = value
        shard_bytes += size
    if len(shards) == 1:
        names = ["model.safetensors"]
        save_file(shards[0], path("model.safetensors"), metadata={"format": "pt"})
    else:
        names = [f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            save_file(shard, path(name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(value.numel() * value.element_size() for value in hf_state.values())
        with open(path(SAFETENSORS_INDEX), "w") as index_file:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, index_file, indent=2)
    # The configs last: a folder with a config.json holds a whole model, as transformers assumes.
    if token_ids:
        with open(path("generation_config.json"), "w") as generation_file:
            json.dump(token_ids, generation_file, indent=2)
    with open(path("config.json"), "w") as config_file:
        json.dump(hf_config, config_file, indent=2)
    return names


def _model_and_args(options):
    """(model name, architecture, bos id, eos id): from the training TOML (its tokenizer gives the
    special tokens) or from --flavor with --bos-id / --eos-id."""
    bos_id, eos_id = options.bos_id, options.eos_id
    if options.config:
        from torchtitan_like.config.manager import load_config
        from torchtitan_like.data import build_tokenizer

        # The training command's overrides too (e.g. --model.flavor), so the export sees that model.
        config, _ = load_config(["--config", options.config, *options.overrides])
        model_name, flavor, vocab_size = config.model.name, config.model.flavor, config.model.vocab_size
        tokenizer = build_tokenizer(config.model)
        bos_id = tokenizer.bos_id if bos_id is None else bos_id
        eos_id = tokenizer.eos_id if eos_id is None else eos_id
    elif options.flavor:
        model_name, flavor, vocab_size = options.model, options.flavor, -1
        if bos_id is None or eos_id is None:
            print("warning: no --bos-id / --eos-id (or --config naming the tokenizer): config.json gets no special "
                  "token ids, and transformers will assume its defaults", file=sys.stderr)
    else:
        raise ConfigError("export needs the architecture: --config TRAIN.toml or --flavor NAME")
    args = get_model_spec(model_name).args_for(flavor)
    args.vocab_size = vocab_size  # -1: read from the checkpoint
    return model_name, args, bos_id, eos_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_like.checkpoint.hf_convert",
                                     description="Convert Llama weights between Hugging Face and DCP checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_dcp = commands.add_parser("import", help="Hugging Face folder -> DCP checkpoint (step-0, model only)")
    to_dcp.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
    to_dcp.add_argument("--output", required=True, help="checkpoint folder to create (step-0 is written inside)")
    to_dcp.add_argument("--model", default="llama3", help="registered model name")
    to_hf = commands.add_parser("export", help="DCP checkpoint -> Hugging Face folder")
    to_hf.add_argument("--checkpoint", required=True, help="checkpoint folder (newest complete step) or a step folder")
    to_hf.add_argument("--config", default="", help="training TOML giving model.name and model.flavor")
    to_hf.add_argument("--flavor", default="", help="model flavor, instead of --config")
    to_hf.add_argument("--model", default="llama3", help="registered model name (with --flavor)")
    to_hf.add_argument("--output", required=True, help="Hugging Face folder to write")
    to_hf.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES))
    to_hf.add_argument("--max-shard-bytes", type=int, default=5 * 1024**3, help="split safetensors above this size")
    to_hf.add_argument("--bos-id", type=int, default=None, help="BOS token id (default: the --config tokenizer's)")
    to_hf.add_argument("--eos-id", type=int, default=None, help="EOS token id (default: the --config tokenizer's)")
    options, overrides = parser.parse_known_args(argv)
    if overrides and not (options.command == "export" and options.config):
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (--section.key value overrides go with "
                     f"export --config)")
    if options.command == "export" and options.max_shard_bytes < 1:
        parser.error(f"--max-shard-bytes {options.max_shard_bytes}: must be at least 1")
    options.overrides = overrides
    # One process on purpose: DCP's "assuming single process" notice is noise here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        if options.command == "import":
            path = import_hf(options.hf, options.output, options.model)
            print(f"wrote {path}; point checkpoint.initial_load_path at {options.output}")
        else:
            model_name, args, bos_id, eos_id = _model_and_args(options)
            files = export_hf(options.checkpoint, options.output, args, model_name, options.dtype,
                              options.max_shard_bytes, bos_id=bos_id, eos_id=eos_id,
                              given_ids={"--bos-id": options.bos_id, "--eos-id": options.eos_id})
            print(f"wrote config.json and {', '.join(files)} to {options.output}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
