"""`prepare-data`: tokenize a corpus once into binary shards that training memory-maps.

    python -m torchtitan_like.data.prepare --input corpus/ --output data/tokens \\
        --tokenizer auto --tokenizer-path assets/llama3 --validation-fraction 0.01

Then train with `training.dataset = "tokenized"`, `training.dataset_path = "data/tokens"` (and the
same for `[validation]`). `--input builtin` tokenizes the shipped corpus with its own train/validation
split. Documents keep their corpus order; with `--validation-fraction F` an evenly spread fraction F
of them (document i when floor((i+1)F) > floor(iF)) goes to the validation split instead of train.
Shards and metadata are written to `<output>.partial` and moved into `<output>` only once complete,
so a mistake in --input, bad data, an interruption or a full disk never touches a dataset already
there; a failed write (full disk, I/O error) removes `<output>.partial` and exits with code 2 and one
`error:` line naming the file, the OS error and the free space left.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from torchtitan_like.data.builtin_corpus import load_builtin_documents
from torchtitan_like.data.packing import token_dtype
from torchtitan_like.data.shards import METADATA_FILE, ShardMetadata, ShardWriter
from torchtitan_like.data.sources import iter_documents
from torchtitan_like.data.tokenizers import TOKENIZER_KINDS, Tokenizer, load_tokenizer
from torchtitan_like.errors import USER_ERROR_EXIT_CODE, DataError, UserError
from torchtitan_like.filesystem import storage_error

BUILTIN_INPUT = "builtin"
DEFAULT_SHARD_TOKENS = 100_000_000
DOCUMENTS_PER_BATCH = 256
STAGING_SUFFIX = ".partial"  # `<output>.partial`: where a run writes before its result replaces `<output>`


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_like.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True,
                        help='corpus file, folder or glob (.txt/.jsonl/.json/.parquet), or "builtin"')
    parser.add_argument("--output", required=True, help="folder for metadata.json and the .bin shards")
    parser.add_argument("--tokenizer", default="auto", choices=TOKENIZER_KINDS, help="tokenizer kind (default auto)")
    parser.add_argument("--tokenizer-path", default="", help="tokenizer.json / tokenizer.model or their folder; "
                                                             "empty = built-in byte tokenizer")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet records")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="fraction of documents held out as the validation split (0 = none)")
    args = parser.parse_args(argv)
    if args.tokenizer in ("hf", "tiktoken") and not args.tokenizer_path:  # load_tokenizer names the trainer's key
        parser.error(f"--tokenizer {args.tokenizer} needs --tokenizer-path (a tokenizer file or its folder)")
    if args.shard_tokens < 1:
        parser.error("--shard-tokens must be at least 1")
    if not 0.0 <= args.validation_fraction < 1.0:
        parser.error("--validation-fraction must be in [0, 1)")
    if args.input == BUILTIN_INPUT and args.validation_fraction:
        parser.error("--validation-fraction does not apply to --input builtin: the built-in corpus has its own "
                     "validation split (every 10th document)")
    return args


def split_documents(documents: Iterable[str], validation_fraction: float) -> Iterator[tuple[str, str]]:
    """(split, document) pairs; see the module docstring for the hold-out rule."""
    for index, document in enumerate(documents):
        held_out = int((index + 1) * validation_fraction) > int(index * validation_fraction)
        yield ("validation" if held_out else "train"), document


def labelled_documents(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if args.input == BUILTIN_INPUT:
        for split in ("train", "validation"):
            yield from ((split, document) for document in load_builtin_documents(split))
        return
    yield from split_documents(iter_documents(args.input, args.text_field), args.validation_fraction)


class Progress:
    """Documents and tokens done: a tqdm bar when tqdm is installed, else a stderr line every 2 s."""

    def __init__(self):
        try:
            from tqdm import tqdm
            self._bar = tqdm(unit=" docs", desc="tokenizing", file=sys.stderr)
        except ImportError:
            self._bar = None
        self.documents = self.tokens = 0
        self._last_print = time.monotonic()

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(documents)
            self._bar.set_postfix(tokens=f"{self.tokens:,}", refresh=False)
        elif time.monotonic() - self._last_print > 2.0:
            print(f"tokenizing: {self.documents:,} documents, {self.tokens:,} tokens", file=sys.stderr, flush=True)
            self._last_print = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def prepare(args: argparse.Namespace) -> ShardMetadata:
    """Tokenize into a staging folder beside `--output` and move the result in only when it is
    complete: a wrong --input, bad data or an interrupted run leaves a dataset already there intact."""
    tokenizer: Tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_path)
    output = Path(args.output).resolve()  # "." or "out/.." have no name to put ".partial" after
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {args.output} is a file; expected a folder for the shards")
    staging = output.with_name(output.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier run that did not finish
    replacing = False
    try:
        staging.mkdir(parents=True)
        metadata = _tokenize_into(staging, args, tokenizer)
        replacing = True
        _replace_dataset(output, staging)
    except OSError as error:  # a full disk, an I/O error: a StorageError naming the file
        shutil.rmtree(staging, ignore_errors=True)  # first, so that the free space reported counts it
        left = (f"{output} may be left without its {METADATA_FILE}, which training refuses: run prepare-data "
                f"again" if replacing else f"{output} was not changed")
        raise storage_error("prepare-data", error.filename or staging, error,
                            f"The partial output {staging.name} was removed; {left}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def _replace_dataset(output: Path, staging: Path) -> None:
    """Swap a finished dataset in: the old metadata goes first and the new comes last, so a crash
    in between leaves a folder that loading rejects rather than a mix of old and new shards."""
    output.mkdir(parents=True, exist_ok=True)
    (output / METADATA_FILE).unlink(missing_ok=True)
    for stale in list(output.glob("train_*.bin")) + list(output.glob("validation_*.bin")):
        stale.unlink()
    for shard in sorted(staging.glob("*.bin")):
        shard.replace(output / shard.name)
    (staging / METADATA_FILE).replace(output / METADATA_FILE)


def _tokenize_into(folder: Path, args: argparse.Namespace, tokenizer: Tokenizer) -> ShardMetadata:
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(folder, split, dtype, args.shard_tokens) for split in ("train", "validation")}
    batches: dict[str, list[str]] = {"train": [], "validation": []}
    progress = Progress()

    def flush(split: str) -> None:
        tokens = tokenizer.encode_documents(batches[split])
        writers[split].add_document_tokens(tokens, len(batches[split]))
        progress.update(len(batches[split]), len(tokens))
        batches[split] = []

    for split, document in labelled_documents(args):
        batches[split].append(document)
        if len(batches[split]) == DOCUMENTS_PER_BATCH:
            flush(split)
    for split in batches:
        if batches[split]:
            flush(split)
    progress.close()
    splits = {split: writer.close() for split, writer in writers.items()}
    if splits["train"].num_tokens == 0:
        raise DataError(f"the corpus {args.input} holds no documents (every file is empty)")
    if splits["validation"].num_documents == 0:
        del splits["validation"]
    metadata = ShardMetadata(dtype=dtype.name, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                             eos_id=tokenizer.eos_id, tokenizer_kind=tokenizer.kind, tokenizer_path=tokenizer.path,
                             source=args.input, text_field=args.text_field, splits=splits)
    metadata.save(folder)
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metadata = prepare(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    for split, info in metadata.splits.items():
        print(f"{split}: {info.num_documents:,} documents, {info.num_tokens:,} {metadata.dtype} tokens "
              f"in {len(info.shards)} shard(s)")
    print(f"wrote {Path(args.output) / METADATA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
