from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data.conftest import make_job_config
from torchtitan_like.data import build_dataloader
from torchtitan_like.data.prepare import main
from torchtitan_like.data.shards import load_token_shards
from torchtitan_like.data.tokenizers import ByteTokenizer, load_tokenizer
from torchtitan_like.errors import DataError


@pytest.fixture()
def prepared(tmp_path):
    (tmp_path / "doc.txt").write_text("some text for the shards " * 20)
    output = tmp_path / "out"
    main(["--input", str(tmp_path / "doc.txt"), "--output", str(output), "--shard-tokens", "200"])
    return output


def edit_metadata(folder, change):
    path = folder / "metadata.json"
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


def test_missing_folder_or_metadata_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_token_shards(tmp_path / "nope", "train")
    with pytest.raises(DataError, match=f"{tmp_path / 'metadata.json'} is missing"):
        load_token_shards(tmp_path, "train")


def test_truncated_shard_is_a_data_error_naming_it(prepared):
    shard = prepared / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=f"shard {shard} has 398 bytes .* 200 uint16 tokens = 400 bytes"):
        load_token_shards(prepared, "train")


def test_shard_written_in_another_dtype_is_a_data_error(prepared):
    shard = prepared / "train_00000.bin"
    shard.write_bytes(np.fromfile(shard, dtype="<u2").astype("<u4").tobytes())
    with pytest.raises(DataError, match=f"shard {shard} .* another dtype"):
        load_token_shards(prepared, "train")


def test_unsupported_dtype_in_metadata_is_a_data_error(prepared):
    edit_metadata(prepared, lambda metadata: metadata.update(dtype="float32"))
    with pytest.raises(DataError, match=r'dtype "float32" is not one of uint16, uint32'):
        load_token_shards(prepared, "train")


def test_missing_shard_and_malformed_metadata_are_data_errors(prepared):
    (prepared / "train_00001.bin").unlink()
    with pytest.raises(DataError, match=f"shard {prepared / 'train_00001.bin'} .* is missing"):
        load_token_shards(prepared, "train")
    edit_metadata(prepared, lambda metadata: metadata.pop("splits"))
    with pytest.raises(DataError, match="not valid prepare-data metadata"):
        load_token_shards(prepared, "train")


def test_vocabulary_mismatch_with_the_configured_tokenizer_is_refused(prepared, tiktoken_file):
    with pytest.raises(DataError, match=f"{prepared} was tokenized with byte tokenizer .*vocab_size=258"):
        load_token_shards(prepared, "train", load_tokenizer("tiktoken", str(tiktoken_file)))


def test_missing_validation_split_says_how_to_make_one(prepared):
    config = make_job_config(dataset="tokenized", dataset_path=str(prepared))
    config.validation.dataset = "tokenized"
    with pytest.raises(DataError, match=r'no "validation" split .* --validation-fraction'):
        build_dataloader(config, ByteTokenizer(), 0, 1, split="validation")


def test_checksum_verification_detects_changed_bytes(prepared):
    shard = prepared / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    load_token_shards(prepared, "train")  # sizes still match: only the checksum notices
    with pytest.raises(DataError, match=f"shard {shard} does not match its SHA-256"):
        load_token_shards(prepared, "train", verify_checksums=True)


def test_the_training_config_can_ask_the_loader_to_verify_checksums(prepared):
    shard = prepared / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    config = make_job_config(dataset="tokenized", dataset_path=str(prepared), seq_len=8, local_batch_size=1)
    next(iter(build_dataloader(config, ByteTokenizer(), 0, 1)))  # off by default: sizes only
    config.training.dataset_verify_checksums = True
    with pytest.raises(DataError, match=f"shard {shard} does not match its SHA-256"):
        next(iter(build_dataloader(config, ByteTokenizer(), 0, 1)))



@pytest.mark.parametrize("mistake, message", [
    ("no validation split", r'no "validation" split .* --validation-fraction'),
    ("another tokenizer", r"was tokenized with byte tokenizer .*vocab_size=258"),
    ("too few validation tokens", r"validation split\) has \d+ tokens, too few: 2 data-parallel rank\(s\) x 32 sample"),
    ("truncated shard", r"train_00000.bin has 398 bytes"),
    ("changed byte", r"train_00000.bin does not match its SHA-256"),
])
def test_the_start_up_check_refuses_what_the_loaders_would(tmp_path, tiktoken_file, mistake, message):
    """`train --check-config` runs startup.check_user_inputs in one process before torchrun: it must
    stop every prepare-data mistake the loaders would otherwise hit on every rank after the process
    group exists (each of these passed it before)."""
    from torchtitan_like.startup import check_user_inputs

    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"{name} some text for the shards " * 20)
    prepared = tmp_path / "out"
    fraction = "0" if mistake == "no validation split" else "0.5"
    main(["--input", str(tmp_path / "*.txt"), "--output", str(prepared), "--shard-tokens", "200",
          "--validation-fraction", fraction])
    config = make_job_config(dataset="tokenized", dataset_path=str(prepared), seq_len=8, local_batch_size=1,
                             steps=2, dataset_verify_checksums=True)
    config.job.dump_folder = str(tmp_path / "run")
    config.lr_scheduler.warmup_steps = 0
    config.validation.enable, config.validation.dataset, config.validation.local_batch_size = True, "tokenized", 2
    if mistake != "no validation split":
        check_user_inputs(config, world_size=2)  # fine as prepared
    shard = prepared / "train_00000.bin"
    if mistake == "another tokenizer":
        config.model.tokenizer, config.model.hf_assets_path = "tiktoken", str(tiktoken_file)
    elif mistake == "too few validation tokens":
        config.validation.local_batch_size = 32  # 2 ranks x 32 x 9 tokens: more than the split's 542
    elif mistake == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif mistake == "changed byte":
        data = bytearray(shard.read_bytes())
        data[0] ^= 1
        shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=message):
        check_user_inputs(config, world_size=2)
