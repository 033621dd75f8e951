"""Hugging Face interop: exported weights give transformers' LlamaForCausalLM our logits, and an
export followed by an import returns the same weights (GQA, Llama 3.1 RoPE scaling, tied embeddings)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import pytest
import torch

from tests.checkpoint.common import build_model, checkpoint_config, tiny_args
from tests.helpers import REPO_ROOT, run_cli, tiny_overrides
from torchtitan_like.checkpoint import create_seed_checkpoint
from torchtitan_like.checkpoint.hf_convert import check_imported_architecture, export_hf, import_hf, read_dcp_model
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import RopeScaling
from torchtitan_like.models.llama3.state_dict_adapter import Llama3StateDictAdapter, args_from_hf_config, hf_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CONFIGS = {
    "gqa": {},
    "rope_scaling": {"rope_scaling": RopeScaling(factor=8.0, original_max_position_embeddings=16)},
    "tied_embeddings": {"tie_word_embeddings": True},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_model_matches_our_logits_in_transformers_and_imports_back_identically(tmp_path, name):
    args = tiny_args(**CONFIGS[name])
    model = build_model(args, seed=1)
    create_seed_checkpoint(checkpoint_config(), str(tmp_path), model)
    export_hf(str(tmp_path / "checkpoint"), str(tmp_path / "hf"), args)

    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    if name == "rope_scaling":
        assert hf_model.config.rope_parameters["rope_type"] == "llama3"
    tokens = torch.randint(0, args.vocab_size, (2, 40))  # longer than the scaled RoPE's original context
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), atol=1e-4, rtol=0)

    import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    _, imported = read_dcp_model(str(tmp_path / "imported"))
    expected = model.state_dict()
    assert imported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(imported[key], value), key

    # Training from the import checks that the configured flavor has its architecture: the same
    # shapes with another RoPE base would load and compute other logits.
    for path in (tmp_path / "imported", tmp_path / "imported" / "step-0"):
        check_imported_architecture(str(path), "llama3", args)
    with pytest.raises(ConfigError, match=r"rope_theta: imported 500000.0, model.flavor gives 10000.0"):
        check_imported_architecture(str(tmp_path / "imported"), "llama3", replace(args, rope_theta=10000.0))


def test_adapter_round_trip_and_config_round_trip():
    args = tiny_args(rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True)
    state = build_model(args).state_dict()
    adapter = Llama3StateDictAdapter(args)
    hf_state = adapter.to_hf(state)
    assert "lm_head.weight" not in hf_state  # tied: HF re-ties it on load
    assert not torch.equal(hf_state["model.layers.0.self_attn.q_proj.weight"], state["layers.0.attention.wq.weight"])
    back = adapter.from_hf(hf_state)
    assert all(torch.equal(back[key], value) for key, value in state.items())
    rebuilt = args_from_hf_config(hf_config(args))
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
                  "rope_scaling", "max_seq_len", "tie_word_embeddings", "head_dim"):
        assert getattr(rebuilt, field) == getattr(args, field), field


def test_command_line_exports_sharded_safetensors_and_imports_them(tmp_path):
    """The documented commands, on the debug flavor (vocabulary size read from the checkpoint)."""
    from torchtitan_like.models.llama3 import get_flavor

    args = get_flavor("debugmodel")
    args.vocab_size = 128
    model = build_model(args, seed=2)
    create_seed_checkpoint(checkpoint_config(), str(tmp_path), model)
    config = os.path.join(REPO_ROOT, "train_configs", "debug_model.toml")
    export = run_cli(["export", "--checkpoint", str(tmp_path / "checkpoint"), "--config", config,
                      "--output", str(tmp_path / "hf"), "--max-shard-bytes", "2000000"],
                     module="torchtitan_like.checkpoint.hf_convert")
    assert export.returncode == 0, export.stderr
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # The debug config's byte tokenizer: BOS 256, EOS 257 (transformers would assume 1 and 2).
    exported_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation_config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    for written in (exported_config, generation_config):
        assert (written["bos_token_id"], written["eos_token_id"]) == (256, 257)
    imported = run_cli(["import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")],
                       module="torchtitan_like.checkpoint.hf_convert")
    assert imported.returncode == 0, imported.stderr
    _, state = read_dcp_model(str(tmp_path / "imported"))
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())

    # The trainer refuses a flavor whose architecture differs from the import's, before any training.
    check_imported_architecture(str(tmp_path / "imported"), "llama3", get_flavor("debugmodel"))
    imported_config_path = tmp_path / "imported" / "hf_import_config.json"
    imported_config = json.loads(imported_config_path.read_text())
    imported_config["config"]["rope_theta"] = imported_config["config"]["rope_parameters"]["rope_theta"] = 10000.0
    imported_config_path.write_text(json.dumps(imported_config))
    train = run_cli(tiny_overrides(str(tmp_path / "run"), steps=1) + [
        "--checkpoint.enable", "true", "--checkpoint.initial_load_path", str(tmp_path / "imported")], timeout=120)
    assert train.returncode == 2, train.stdout + train.stderr
    assert "rope_theta: imported 10000.0, model.flavor gives 500000.0" in train.stderr


def test_export_of_a_missing_checkpoint_is_a_user_error_with_exit_code_2(tmp_path, capsys):
    from torchtitan_like.checkpoint.hf_convert import main

    code = main(["export", "--checkpoint", str(tmp_path / "nothing"), "--flavor", "debugmodel",
                 "--output", str(tmp_path / "hf")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("options,message", [
    (["--bos-id", "-1", "--eos-id", "1"], "--bos-id -1: must be a token id in [0, 127]"),
    (["--bos-id", "0", "--eos-id", "128"], "--eos-id 128: must be a token id in [0, 127]"),
    (["--bos-id", "0", "--eos-id", "1", "--output", "FILE"], "is not a writable folder"),  # names --output
])
def test_bad_export_options_exit_2_naming_the_option(tmp_path, capsys, options, message):
    from torchtitan_like.checkpoint.hf_convert import main
    from torchtitan_like.models.llama3 import get_flavor

    args = get_flavor("debugmodel")
    args.vocab_size = 128
    create_seed_checkpoint(checkpoint_config(), str(tmp_path), build_model(args, seed=2))
    (tmp_path / "file").write_text("")
    options = [str(tmp_path / "file") if option == "FILE" else option for option in options]
    code = main(["export", "--checkpoint", str(tmp_path / "checkpoint"), "--flavor", "debugmodel",
                 "--output", str(tmp_path / "hf"), *options])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "job.dump_folder" not in err, err


@pytest.mark.parametrize("config_json,message", [("{", "config.json: not valid JSON"),
                                                 ("{}", "config.json: missing setting 'hidden_size'")])
def test_import_of_a_bad_config_json_exits_2_naming_the_file(tmp_path, capsys, config_json, message):
    from torchtitan_like.checkpoint.hf_convert import main

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(config_json)
    assert main(["import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_reads_the_training_commands_overrides_with_its_config(tmp_path, capsys):
    from torchtitan_like.checkpoint.hf_convert import main
    from torchtitan_like.models.llama3 import get_flavor

    args = get_flavor("debugmodel")
    args.vocab_size = 128
    create_seed_checkpoint(checkpoint_config(), str(tmp_path), build_model(args, seed=2))
    command = ["export", "--checkpoint", str(tmp_path / "checkpoint"), "--output", str(tmp_path / "hf"),
               "--config", os.path.join(REPO_ROOT, "train_configs", "debug_model.toml")]
    assert main(command) == 0
    # The run was trained as --model.flavor 1B, say: the export must build that model (and so refuse
    # this debug checkpoint), not the TOML's flavor.
    assert main([*command, "--model.flavor", "1B"]) == 2
    assert "tok_embeddings.weight" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage_error:  # overrides only with --config
        main(["export", "--checkpoint", str(tmp_path / "checkpoint"), "--output", str(tmp_path / "hf2"),
              "--flavor", "debugmodel", "--model.flavor", "1B"])
    assert usage_error.value.code == 2


def _write_hf_folder(folder, args, seed=1, shards=1, dtype=torch.float32):
    """A Hugging Face folder (config.json, safetensors) of a tiny model, written without transformers;
    with shards > 1, `model-0000i-of-0000n.safetensors` and the index. Returns our state dict."""
    from safetensors.torch import save_file

    state = {name: value.to(dtype) for name, value in build_model(args, seed=seed).state_dict().items()}
    hf_state = {name: value.contiguous() for name, value in Llama3StateDictAdapter(args).to_hf(state).items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args)))
    if shards == 1:
        save_file(hf_state, str(folder / "model.safetensors"))
        return state
    names = sorted(hf_state)
    weight_map = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: hf_state[name] for name in names[index::shards]}, str(folder / file_name))
        weight_map.update({name: file_name for name in names[index::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


def _assert_imported(tmp_path, hf_folder, expected_state):
    import_hf(str(hf_folder), str(tmp_path / "imported"))
    _, imported = read_dcp_model(str(tmp_path / "imported"))
    assert imported.keys() == expected_state.keys()
    assert all(torch.equal(imported[key], value) for key, value in expected_state.items())


@pytest.mark.parametrize("first_shard_bytes,second_shard_bytes", [(20_000, 10**9), (10**9, 20_000)])
def test_reexport_into_the_same_folder_replaces_the_previous_weight_layout(tmp_path, first_shard_bytes,
                                                                          second_shard_bytes):
    """A sharded export over an unsharded one (or the reverse) must not leave the old layout: readers
    disagree on which of model.safetensors and an index wins, and one would load the old weights."""
    from torchtitan_like.checkpoint.hf_convert import write_dcp_model

    args = tiny_args()
    first, second = build_model(args, seed=1), build_model(args, seed=2)
    write_dcp_model(first.state_dict(), str(tmp_path / "first"))
    write_dcp_model(second.state_dict(), str(tmp_path / "second"))
    export_hf(str(tmp_path / "first"), str(tmp_path / "hf"), tiny_args(), max_shard_bytes=first_shard_bytes)
    files = export_hf(str(tmp_path / "second"), str(tmp_path / "hf"), tiny_args(), max_shard_bytes=second_shard_bytes)
    index = ["model.safetensors.index.json"] if len(files) > 1 else []
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(["config.json", *files, *index])
    _assert_imported(tmp_path, tmp_path / "hf", second.state_dict())


def test_an_export_onto_a_full_disk_is_a_storage_error_and_removes_the_weights_it_wrote(tmp_path, monkeypatch):
    """safetensors reports a full disk as a SafetensorError ('... (os error 28)'), not an OSError."""
    import safetensors
    import safetensors.torch

    from torchtitan_like.checkpoint.hf_convert import write_dcp_model
    from torchtitan_like.errors import StorageError

    write_dcp_model(build_model(tiny_args(), seed=1).state_dict(), str(tmp_path / "checkpoint"))
    real_save_file, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 1:  # the first shard fits
            return real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "wb") as partial:
            partial.write(b"\0" * 1000)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(StorageError) as raised:  # before: the SafetensorError's traceback, exit code 1
        export_hf(str(tmp_path / "checkpoint"), str(tmp_path / "hf"), tiny_args(), max_shard_bytes=20_000)
    message = str(raised.value)
    assert message.startswith(f"exporting {tmp_path / 'checkpoint' / 'step-0'} failed: {calls[1]}: "
                              f"No space left on device (ENOSPC); ")
    assert " free of " in message and f"The files written to {tmp_path / 'hf'} were removed" in message
    # the first shard and the partial second: gone, and no config.json presents the folder as a model
    assert os.listdir(tmp_path / "hf") == []


def test_import_reads_model_safetensors_before_an_index_beside_it_as_transformers_does(tmp_path):
    args = tiny_args()
    _write_hf_folder(tmp_path / "hf", args, seed=1, shards=2)  # index and shards of another model
    expected = _write_hf_folder(tmp_path / "hf", args, seed=2)
    _assert_imported(tmp_path, tmp_path / "hf", expected)


def test_import_of_a_sharded_bfloat16_folder_keeps_the_weights_bit_exact(tmp_path):
    """As Meta's Llama 3 downloads are stored: bfloat16, several shards, tied embeddings."""
    args = tiny_args(tie_word_embeddings=True)
    state = _write_hf_folder(tmp_path / "hf", args, shards=3, dtype=torch.bfloat16)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    _, imported = read_dcp_model(str(tmp_path / "imported"))
    assert imported.keys() == state.keys()
    for key, value in state.items():
        assert imported[key].dtype == torch.float32 and torch.equal(imported[key].to(torch.bfloat16), value), key


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _edit_config(folder, **settings):
    config = json.loads((folder / "config.json").read_text())
    config.update(settings)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(path, drop=(), add=None):
    from safetensors.torch import load_file, save_file

    tensors = {name: value for name, value in load_file(str(path)).items() if name not in drop}
    save_file({**tensors, **(add or {})}, str(path))


SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
BAD_HF_FOLDERS = {  # name: (shards, tied, change to the folder, what the error names)
    "truncated_shard": (2, False, lambda folder: _truncate(folder / SHARD_2),
                        f"{SHARD_2}: not a readable safetensors file"),
    "index_not_json": (2, False, lambda folder: (folder / "model.safetensors.index.json").write_text("{"),
                       "model.safetensors.index.json: not a safetensors index"),
    "index_without_weight_map": (2, False, lambda folder: (folder / "model.safetensors.index.json").write_text("{}"),
                                 "model.safetensors.index.json: not a safetensors index"),
    "tensor_in_two_shards": (2, False, lambda folder: _edit_weights(folder / SHARD_2, add={
        "model.norm.weight": torch.ones(64)}), f"model.norm.weight is in both {SHARD_1} and {SHARD_2}"),
    "tied_without_embedding": (1, True, lambda folder: _edit_weights(
        folder / "model.safetensors", drop=["model.embed_tokens.weight"]),
        "weight model.embed_tokens.weight is missing"),
    "untied_without_lm_head": (1, False, lambda folder: _edit_weights(
        folder / "model.safetensors", drop=["lm_head.weight"]), "weight lm_head.weight is missing"),
    "extra_tensor": (1, False, lambda folder: _edit_weights(folder / "model.safetensors", add={
        "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
        "model.layers.0.self_attn.q_proj.bias (in model.safetensors)"),
    "fewer_key_value_heads": (1, False, lambda folder: _edit_config(folder, num_key_value_heads=4),
                              "model.layers.0.self_attn.k_proj.weight (in model.safetensors) has shape (32, 64), "
                              "config.json implies (64, 64)"),
    "query_rows_not_whole_heads": (1, False, lambda folder: _edit_weights(folder / "model.safetensors", add={
        "model.layers.1.self_attn.q_proj.weight": torch.zeros(60, 64)}),
        "model.layers.1.self_attn.q_proj.weight (in model.safetensors) has shape (60, 64)"),
}


@pytest.mark.parametrize("name", list(BAD_HF_FOLDERS))
def test_import_of_a_bad_hf_folder_exits_2_naming_the_tensor_or_file(tmp_path, capsys, name):
    from torchtitan_like.checkpoint.hf_convert import main

    shards, tied, change, message = BAD_HF_FOLDERS[name]
    _write_hf_folder(tmp_path / "hf", tiny_args(tie_word_embeddings=tied), shards=shards)
    change(tmp_path / "hf")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_conversion_without_safetensors_installed_exits_2_saying_what_to_install(tmp_path, capsys, monkeypatch):
    from torchtitan_like.checkpoint.hf_convert import main

    _write_hf_folder(tmp_path / "hf", tiny_args())
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main(["import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "out")]) == 2
    assert "pip install safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("rope_scaling,expected", [
    ({"rope_type": "default"}, None),  # plain RoPE, as some transformers versions write it
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, RopeScaling(factor=8.0)),  # the older "type" key
])
def test_hf_rope_scaling_spellings_read_as_the_rope_they_describe(rope_scaling, expected):
    config = {**hf_config(tiny_args()), "rope_scaling": rope_scaling}
    del config["rope_parameters"]
    assert args_from_hf_config(config).rope_scaling == expected


def test_unsupported_hf_rope_scaling_type_is_named_in_the_error():
    config = {**hf_config(tiny_args()), "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(ConfigError, match="rope scaling type 'linear' is not supported"):
        args_from_hf_config(config)


def test_export_with_a_tied_architecture_refuses_an_untied_checkpoint(tmp_path):
    """Same shapes either way; exporting tied would drop the trained LM head without a word."""
    from torchtitan_like.checkpoint.hf_convert import write_dcp_model
    from torchtitan_like.errors import DataError

    write_dcp_model(build_model(tiny_args(), seed=1).state_dict(), str(tmp_path / "untied"))
    with pytest.raises(DataError, match="trained with an untied LM head"):
        export_hf(str(tmp_path / "untied"), str(tmp_path / "hf"), tiny_args(tie_word_embeddings=True))
    assert not (tmp_path / "hf").exists()


def test_import_into_a_folder_holding_a_runs_checkpoints_is_refused_and_leaves_them(tmp_path):
    """Beside step-N the import (step-0) would never be loaded: the newest step wins. A previous
    import alone may be replaced."""
    from torchtitan_like.checkpoint.hf_convert import write_dcp_model

    args = tiny_args()
    _write_hf_folder(tmp_path / "hf", args, seed=1)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))  # re-import: fine
    write_dcp_model(build_model(args, seed=2).state_dict(), str(tmp_path / "ckpt"), step=40)
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(step-40\).*choose an empty folder"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["hf_import_config.json", "step-0", "step-40"]
