"""Bad values for every config key: a UserError naming the key and what is allowed, caught by the
start-up checks (`train --check-config`), never a traceback later in torch, numpy or C++."""

from __future__ import annotations

import re
import typing
from dataclasses import fields

import pytest

from tests.helpers import tiny_overrides
from torchtitan_like.config import load_config
from torchtitan_like.config.job_config import SECTIONS
from torchtitan_like.errors import USER_ERROR_EXIT_CODE, ConfigError, UserError
from torchtitan_like.startup import check_user_inputs
from torchtitan_like.train import main


def keys_of_type(kind: type) -> list[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items()
            for f in fields(cls) if typing.get_type_hints(cls)[f.name] is kind and f.name != "config_file"]


def keys_with_choices() -> list[tuple[str, tuple]]:
    return [(f"{section}.{f.name}", f.metadata["choices"]) for section, cls in SECTIONS.items()
            for f in fields(cls) if f.metadata.get("choices")]


def check(tmp_path, *overrides: str, world_size: int = 1):
    config, _ = load_config(tiny_overrides(str(tmp_path / "run")) + list(overrides))
    return check_user_inputs(config, world_size)


@pytest.mark.parametrize("key", keys_of_type(int))
def test_every_integer_key_refuses_a_non_integer_and_a_value_beyond_64_bits(tmp_path, key):
    for value in ("ten", "1.5", "true", "", "[1]"):
        with pytest.raises(ConfigError, match=rf"command line: {key} = .*: expected an integer"):
            load_config([f"--{key}={value}"])
    # Beyond int64 a value overflowed where it reached torch: a C++ traceback, after start-up.
    too_large = 2**64 if key == "training.seed" else 2**63  # torch.manual_seed takes up to 2**64 - 1
    with pytest.raises(ConfigError, match=rf"command line: {key} = {too_large} is out of range: must be <= \d+$"):
        load_config([f"--{key}={too_large}"])
    section, name = key.split(".")
    path = tmp_path / "bad.toml"
    for value in ("1.5", "true", '"7"', "[1]"):
        path.write_text(f"[{section}]\n{name} = {value}\n")
        with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: {key} = .*expected an integer"):
            load_config(["--config", str(path)])


@pytest.mark.parametrize("key", keys_of_type(float))
def test_every_number_key_refuses_a_non_number_and_a_non_finite_value(key):
    for value in ("abc", "", "[1]", "true", "nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match=rf"command line: {key} = .*(expected a number|expected a finite)"):
            load_config([f"--{key}={value}"])


@pytest.mark.parametrize("key", keys_of_type(bool))
def test_every_boolean_key_refuses_a_non_boolean(key):
    for value in ("maybe", "2", "", "[true]"):
        with pytest.raises(ConfigError, match=rf"command line: {key} = .*expected a boolean"):
            load_config([f"--{key}={value}"])


@pytest.mark.parametrize("key,choices", keys_with_choices())
def test_every_key_with_choices_refuses_an_unknown_one_and_lists_the_allowed(key, choices):
    for value in ("bogus", "", choices[0].upper() + "x"):
        allowed = re.escape(", ".join(choices))
        with pytest.raises(ConfigError, match=rf"{key} = .* is not allowed.*; allowed: {allowed}$"):
            load_config([f"--{key}={value}"])


@pytest.mark.parametrize("overrides,message", [
    # torch's Adam refused a beta of 1 with a ValueError traceback when the optimizer was built
    (["--optimizer.beta1", "1"], "optimizer.beta1 = 1.0 is out of range: must be < 1"),
    (["--optimizer.beta2=1.0"], "optimizer.beta2 = 1.0 is out of range: must be < 1"),
    # an embedding of 2**63 - 1 rows: "Storage size calculation overflowed" at model construction
    (["--model.vocab_size", str(2**63 - 1)], f"model.vocab_size = {2**63 - 1} is out of range: must be <= 4294967296"),
    # timedelta and gloo overflowed (a negative timeout) when the process group was created
    (["--comm.init_timeout_seconds", str(10**13)], "comm.init_timeout_seconds = 10000000000000 is out of range"),
    (["--comm.train_timeout_seconds", str(10**15)], "comm.train_timeout_seconds = 1000000000000000 is out of range"),
    (["--comm.trace_buf_size", str(2**31)], "comm.trace_buf_size = 2147483648 is out of range: must be <= 2147483647"),
    # an empty path (an unset shell variable) silently trained the defaults
    (["--config", ""], "command line: --config = '': needs the path of a TOML file"),
    (["--job.config_file="], "command line: --job.config_file = '': needs the path of a TOML file"),
], ids=["beta1=1", "beta2=1", "vocab_size=2**63-1", "init_timeout=1e13", "train_timeout=1e15",
        "trace_buf_size=2**31", "config=''", "job.config_file=''"])
def test_values_that_failed_later_in_torch_are_refused_when_the_config_is_read(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("text,message", [
    # TOML integers have no size limit: float() raised OverflowError, int parsing a ValueError
    ("[optimizer]\nlr = " + "9" * 400 + "\n", "optimizer.lr: an integer of 400 digits is beyond the largest number"),
    ("[training]\nsteps = " + "9" * 5000 + "\n", "malformed TOML: Exceeds the limit (4300 digits)"),
], ids=["float_key_given_a_400_digit_integer", "integer_of_5000_digits"])
def test_toml_integers_too_large_for_python_are_config_errors(tmp_path, text, message):
    path = tmp_path / "big.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(path)])
    assert str(info.value).startswith(str(path)) and message in str(info.value)


@pytest.mark.parametrize("overrides,world_size,message", [
    # metrics.py took any peak <= 0 for -1: -0.5 silently looked the device up instead
    (["--metrics.peak_flops", "-0.5"], 1, r"metrics.peak_flops = -0.5: use -1 \(look the device up\) or the device's"),
    # layer i is checkpointed when (i + 1) % k == 0: k above the layer count silently checkpointed none
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "5"], 1,
     "selective_ac_option = '5' checkpoints one layer in every 5, but llama3 debugmodel has 4 layers"),
    # the built-in corpus was checked only when the loaders were built, after the process group
    (["--validation.enable", "--validation.local_batch_size", "100000"], 1,
     (r"built-in corpus \(validation split\) has [\d,]+ tokens, too few: 1 data-parallel rank\(s\) x 100000 "
      r"sample\(s\).* or validation.local_batch_size")),
    (["--validation.enable", "--validation.local_batch_size", "2000"], 8, "8 data-parallel rank"),
    (["--training.seq_len", "2048"], 2048, r"built-in corpus \(train split\) has [\d,]+ tokens, too few: 2048"),
    # the tokenizer's message named the path but not the key that gave it
    (["--model.tokenizer", "auto", "--model.hf_assets_path", "{tmp}/no_tokenizer"], 1,
     "model.hf_assets_path = '.*/no_tokenizer': tokenizer path .* does not exist"),
    (["--model.tokenizer", "hf", "--model.tokenizer_path", "{tmp}"], 1,
     "model.tokenizer_path = '.*': no tokenizer.json in"),
    # the dataloader gathered 10**10 samples for minutes until the machine ran out of memory
    (["--training.local_batch_size", str(10**10)], 1,
     r"training.local_batch_size = 10000000000 with training.seq_len = 32: one batch's token ids \(int64 inputs "
     r"and labels\) take 4,768.4 GiB, more than this machine's [\d,.]+ GiB of memory"),
], ids=["peak_flops=-0.5", "selective_ac_option_over_n_layers", "validation_batch_over_builtin_split",
        "validation_batch_over_builtin_split_dp8", "seq_len_over_builtin_train_split_dp2048",
        "hf_assets_path_missing", "tokenizer_path_without_file", "local_batch_over_host_memory"])
def test_values_that_failed_after_start_up_are_refused_by_the_start_up_checks(tmp_path, overrides, world_size,
                                                                               message):
    with pytest.raises(UserError, match=message):
        check(tmp_path, *[item.format(tmp=tmp_path) for item in overrides], world_size=world_size)


def test_a_validation_batch_beyond_host_memory_names_its_own_keys(tmp_path):
    from torchtitan_like.startup import check_batches_fit_in_host_memory

    config, _ = load_config(tiny_overrides(str(tmp_path / "run")) + ["--validation.enable", "--validation.seq_len",
                                                                      "64", "--validation.local_batch_size", "4"])
    check_batches_fit_in_host_memory(config, host_bytes=2 * 8 * 4 * 64)  # exactly fits
    with pytest.raises(ConfigError, match=r"^validation.local_batch_size = 4 with validation.seq_len = 64: "):
        check_batches_fit_in_host_memory(config, host_bytes=2 * 8 * 4 * 64 - 1)


def test_meaningful_edge_values_stay_accepted(tmp_path):
    checked = check(tmp_path, "--optimizer.beta1", "0", "--optimizer.beta2", "0.999999", "--metrics.peak_flops",
                    "989e12", "--comm.init_timeout_seconds", str(2**31 - 1), "--comm.train_timeout_seconds",
                    "86400", "--comm.trace_buf_size", "0", "--training.seed", str(2**64 - 1), "--model.vocab_size",
                    "128256", "--training.steps", str(2**62), "--checkpoint.interval", str(2**62),
                    "--lr_scheduler.warmup_steps", "0", "--lr_scheduler.decay_ratio", "0", "--validation.enable",
                    "--validation.local_batch_size", "64", "--validation.steps", "-1",
                    "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "4")
    assert checked.model_args.vocab_size == 128256


@pytest.mark.parametrize("overrides,world_size,message", [
    (["--optimizer.beta2", "1"], 1, "optimizer.beta2 = 1.0 is out of range"),
    (["--metrics.peak_flops", "-0.5"], 1, "metrics.peak_flops = -0.5"),
    (["--parallelism.tensor_parallel_degree", str(2**63)], 8, "parallelism.tensor_parallel_degree"),
    (["--validation.enable", "--validation.local_batch_size", "2000"], 8, "validation.local_batch_size"),
], ids=["beta2=1", "peak_flops=-0.5", "tp=2**63", "validation_batch_over_builtin_split"])
def test_check_config_prints_one_error_line_and_exits_2(tmp_path, capsys, monkeypatch, overrides, world_size,
                                                         message):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert main(tiny_overrides(str(tmp_path / "run")) + overrides + ["--check-config"]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
