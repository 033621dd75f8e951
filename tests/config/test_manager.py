"""Config loading: TOML + CLI precedence, types, constraints, and exit code 2 on every user mistake."""

import os

import pytest

from tests.forking import run_cli_cases
from tests.helpers import REPO_ROOT, run_cli, tiny_overrides
from torchtitan_like.config import JobConfig, load_config, to_toml
from torchtitan_like.config.manager import parse_cli_overrides, read_toml
from torchtitan_like.errors import ConfigError

DEBUG_TOML = os.path.join(REPO_ROOT, "train_configs", "debug_model.toml")


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cli_overrides_beat_toml_which_beats_defaults(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nseq_len = 64\n[optimizer]\nlr = 0.01\n")
    config, _ = load_config(["--config", path, "--training.steps", "9", "--optimizer.lr=0.5"])
    assert config.training.steps == 9          # CLI over TOML
    assert config.training.seq_len == 64       # TOML over default
    assert config.optimizer.lr == 0.5
    assert config.training.local_batch_size == JobConfig().training.local_batch_size  # default


def test_bare_flag_means_true_and_lists_parse():
    config, _ = load_config(["--compile.enable", "--compile.components", "model",
                             "--parallelism.pipeline_parallel_split_points", '["layers.2", "layers.4"]'])
    assert config.compile.enable is True
    assert config.compile.components == ["model"]
    assert config.parallelism.pipeline_parallel_split_points == ["layers.2", "layers.4"]
    assert parse_cli_overrides(["--lr_scheduler.decay_ratio", "-1"]) == [("lr_scheduler", "decay_ratio", "-1")]


def test_torchtitan_float8_section_and_ignored_sections_load(tmp_path, capsys):
    path = write(tmp_path, '[quantize.linear.float8]\nfilter_fqns = ["output", "wq"]\n'
                           '[quantize.linear.mx]\nrecipe_name = "mxfp8"\n'
                           '[experimental]\ncustom_import = ""\n[training]\nsteps = 3\n')
    config, _ = load_config(["--config", path])
    assert config.float8.filter_fqns == ["output", "wq"]
    assert config.training.steps == 3
    printed = capsys.readouterr().err
    assert "section [quantize.linear.mx] is TorchTitan-only and ignored" in printed  # not dropped silently
    assert "section [experimental] is TorchTitan-only and ignored" in printed


def test_resolved_config_round_trips_through_toml(tmp_path):
    config, _ = load_config(["--config", DEBUG_TOML, "--training.steps", "11"])
    path = write(tmp_path, to_toml(config), "resolved.toml")
    again, _ = load_config(["--config", path])
    again.job.config_file = config.job.config_file  # the only key that records where it was read from
    assert again == config


def test_every_field_is_documented():
    from dataclasses import fields

    from torchtitan_like.config.job_config import SECTIONS

    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.metadata.get("doc"), f"{section}.{f.name} has no doc"


@pytest.mark.parametrize("text,message", [
    ("[training\nsteps = 1\n", "malformed TOML"),
    ("[trainig]\nsteps = 1\n", 'unknown section [trainig] (did you mean "training"?)'),
    ("[training]\nstepz = 1\n", 'unknown key (did you mean "steps"?)'),
    ('[training]\nsteps = "ten"\n', "training.steps = 'ten': expected an integer"),
    ("[training]\nsteps = 0\n", "training.steps = 0 is out of range: must be >= 1"),
    ('[activation_checkpoint]\nmode = "fll"\n', "allowed: none, full, selective"),
    ('[training]\nmixed_precision_param = "float16"\n', "allowed: bfloat16, float32"),  # no loss scaling
    ("[optimizer]\nlr = inf\n", "optimizer.lr = inf: expected a finite number"),  # TOML reads inf and nan
    ("[float8]\nfilter_fqns = [1]\n", "float8.filter_fqns = [1]: expected a list of strings"),
    ("float8 = 1\n[quantize.linear.float8]\nenable = true\n", "[float8] must be a table of keys"),
    ('[quantize.linear]\nfloat8 = "x"\n', "[quantize.linear.float8] must be a table of keys"),
    ("[quantize.linear.fp4]\nenable = true\n", "unknown section [quantize.linear.fp4]; allowed: [quantize.linear.float8]"),
    ("quantize = 1\n", "[quantize] must be a table of keys"),
    ("steps = 3\n[training]\nseq_len = 64\n", "key steps = 3 is outside any section; put it under [training]"),
])
def test_config_mistakes_raise_config_error_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    assert message in str(info.value)
    assert path in str(info.value)


def test_malformed_toml_names_the_line(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 1\nseq_len = = 2\n")
    with pytest.raises(ConfigError, match="line 3"):
        read_toml(path)


BAD_INPUTS = [
    (["--config", "/nonexistent/cfg.toml"], "config file not found: /nonexistent/cfg.toml"),
    (["--training.steps", "0"], "training.steps = 0 is out of range"),
    (["--training.steps", "x"], "expected an integer"),
    (["--trainng.steps", "3"], 'did you mean "training"'),
    (["--lr_scheduler.warmup_steps", "500", "--training.steps", "10"], "warmup_steps = 500 is larger than training.steps = 10"),
    (["--training.seq_len", "4096"], "exceeds the model's maximum sequence length 2048"),
    (["--validation.seq_len", "1"], "validation.seq_len = 1: use -1 (training.seq_len) or at least 2"),
    (["--job.dump_folder", "/dev/null/run"], "job.dump_folder = '/dev/null/run' cannot be created: Not a directory"),
    (["--model.flavor", "9B"], "model.flavor = '9B' is not a flavor of llama3"),
    (["--model.vocab_size", "100"], "model.vocab_size = 100 is smaller than the tokenizer's vocabulary (258)"),
    (["--parallelism.tensor_parallel_degree", "2"], "must equal the number of processes"),
    (["--training.global_batch_size", "3"], "training.global_batch_size = 3 must be a multiple of"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "x"],
     "selective_ac_option = 'x'"),
    # a superscript two passes str.isdigit() but not int(): it was a traceback at model build
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "\u00b2"],
     "selective_ac_option = '\u00b2'"),
    (["--training.dataset", "local"], "training.dataset = 'local' needs training.dataset_path"),
    (["--training.dataset", "local", "--training.dataset_path", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--training.dataset", "tokenized", "--training.dataset_path", "/nonexistent/tokens"], "/nonexistent/tokens"),
    (["--training.steps"], "training.steps: needs a value (an integer)"),  # not the value 'true'
    (["--optimizer.lr", "nan"], "optimizer.lr = nan: expected a finite number"),
    (["--float8.filter_fqns", "[1]"], "float8.filter_fqns = [1]: expected a list of strings"),
    (["--compile.enable", "--compile.backend", "nope"], "compile.backend = 'nope' is not a torch.compile backend"),
    (["--training.global_batch_size", "0"], "training.global_batch_size = 0: use -1"),  # was 0 microbatches
    (["--parallelism.pipeline_parallel_layers_per_stage", "0"], "pipeline_parallel_layers_per_stage = 0: use -1"),
    (["--metrics.peak_flops", "0"], "metrics.peak_flops = 0: use -1"),
    (["--training.seed", str(2**64)], f"training.seed = {2**64} is out of range"),
]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """Every BAD_INPUTS command's result, forked from one interpreter that imported the trainer once
    (tests/forking.py; each case is almost all start-up). test_print_config_... runs the CLI afresh."""
    cases = {}
    for index, (extra, _) in enumerate(BAD_INPUTS):
        args = tiny_overrides(str(tmp_path_factory.mktemp(f"bad_input{index}") / "run"))
        if extra[0] == "--config":
            args = args[2:]
        cases[str(index)] = {"args": args + extra}
    return run_cli_cases(cases, case_timeout=120)


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_clear_message(bad_input_results, extra, message):
    result = bad_input_results[str(BAD_INPUTS.index((extra, message)))]
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_print_config_prints_resolved_toml_and_exits():
    result = run_cli(["--config", DEBUG_TOML, "--training.steps", "42", "--print-config"])
    assert result.returncode == 0, result.stderr
    assert "steps = 42" in result.stdout and "[parallelism]" in result.stdout


def test_docs_config_md_is_generated_from_the_dataclasses():
    from torchtitan_like.config.docs import render

    with open(os.path.join(REPO_ROOT, "docs", "config.md")) as handle:
        assert handle.read() == render(), "regenerate: python -m torchtitan_like.config.docs > docs/config.md"


def test_a_flavor_name_in_the_wrong_case_gets_the_right_suggestion():
    from torchtitan_like.errors import did_you_mean

    assert did_you_mean("8b", ["debugmodel", "1B", "8B", "70B"]) == ' (did you mean "8B"?)'
    assert did_you_mean("70b", ["debugmodel", "1B", "8B", "70B"]) == ' (did you mean "70B"?)'
    assert did_you_mean("wholly-unrelated", ["8B", "70B"]) == ""
