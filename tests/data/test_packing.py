from __future__ import annotations

import numpy as np
import pytest
import torch

from torchtitan_like.data.packing import PackedSamples, TokenStream, collate_samples, encode_corpus, token_dtype
from torchtitan_like.data.tokenizers import ByteTokenizer


def test_documents_are_framed_by_bos_and_eos_and_concatenated():
    tokenizer = ByteTokenizer()
    tokens = encode_corpus(tokenizer, ["ab", "c"])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [256, 97, 98, 257, 256, 99, 257]


def test_samples_are_consecutive_windows_and_labels_are_inputs_shifted_by_one():
    tokens = np.arange(23, dtype=np.uint16)
    dataset = PackedSamples(tokens, seq_len=4)
    assert len(dataset) == 4  # 23 // 5; the 3-token tail is dropped
    inputs, labels = dataset[1]
    assert inputs.dtype == torch.int64
    assert inputs.tolist() == [5, 6, 7, 8] and labels.tolist() == [6, 7, 8, 9]
    with pytest.raises(IndexError):
        dataset[4]


def test_a_sample_starts_with_bos_and_the_label_after_eos_is_the_next_bos():
    tokenizer = ByteTokenizer()
    dataset = PackedSamples(encode_corpus(tokenizer, ["abc", "de"]), seq_len=8)
    inputs, labels = dataset[0]
    assert inputs[0] == tokenizer.bos_id
    eos_position = inputs.tolist().index(tokenizer.eos_id)
    assert labels[eos_position] == tokenizer.bos_id


def test_token_stream_reads_across_array_boundaries():
    stream = TokenStream([np.arange(0, 3, dtype=np.uint16), np.zeros(0, np.uint16), np.arange(3, 10, dtype=np.uint32)])
    assert len(stream) == 10
    assert stream.read(1, 8).tolist() == list(range(1, 8))
    assert stream.read(3, 3).tolist() == []
    dataset = PackedSamples(stream, seq_len=2)
    assert [dataset[i][0].tolist() for i in range(len(dataset))] == [[0, 1], [3, 4], [6, 7]]


def test_dtype_is_uint16_up_to_65536_ids_else_uint32():
    assert token_dtype(258) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_collate_stacks_inputs_and_labels():
    dataset = PackedSamples(np.arange(30, dtype=np.uint16), seq_len=4)
    inputs, labels = collate_samples([dataset[0], dataset[2]])
    assert inputs.shape == labels.shape == (2, 4)
    assert torch.equal(inputs[1], torch.tensor([10, 11, 12, 13]))
