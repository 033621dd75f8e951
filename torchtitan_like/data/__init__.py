"""The data pipeline: tokenizers, corpora, packing into fixed-length samples, resumable loading.

Entry points: `build_tokenizer(model_config)` and `build_dataloader(job_config, tokenizer, dp_rank,
dp_world_size, split)`. `python -m torchtitan_like.data.prepare` pre-tokenizes a corpus into shards.
Each module's docstring documents its formats and choices: sources.py (user corpora), builtin_corpus.py
(the shipped corpus), packing.py, sampler.py (sharding and resume), shards.py and prepare.py.
"""

from torchtitan_like.data.builtin_corpus import load_builtin_documents
from torchtitan_like.data.dataloader import build_dataloader, check_dataset_paths, dataset_settings, load_tokens
from torchtitan_like.data.packing import PackedSamples, TokenStream, encode_corpus, token_dtype
from torchtitan_like.data.sampler import ShardedSampler
from torchtitan_like.data.shards import load_token_shards
from torchtitan_like.data.sources import iter_documents
from torchtitan_like.data.tokenizers import ByteTokenizer, Tokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "PackedSamples", "ShardedSampler", "TokenStream", "Tokenizer", "build_dataloader",
    "check_dataset_paths",
    "build_tokenizer", "dataset_settings", "encode_corpus", "iter_documents", "load_builtin_documents",
    "load_token_shards", "load_tokenizer", "load_tokens", "token_dtype",
]
