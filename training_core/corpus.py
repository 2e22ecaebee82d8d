"""Text corpora larger than memory: documents streamed from the snapshot files, tokenized once into a
memory-mapped token file that later jobs reuse, and training blocks read from that file.

    held_out = corpus.hold_out(snapshots, eval_fraction, max_documents=512, seed=0)   # one streamed pass
    texts = corpus.documents(snapshots, skip=held_out.ordinals, every=corpus.sample_stride(snapshots))
    files = [corpus.token_file(path, tokenizer, spec, events) for path in snapshots]  # built once, reused
    blocks = corpus.TokenBlocks(files, block_size, skip=held_out.ordinals)            # a torch Dataset

Used by `pretrain` and `continued_pretrain`. Nothing here holds the corpus: documents are read one
batch at a time, and blocks are sliced from the token files through `np.memmap`, so memory stays
flat whatever the corpus's size (the page cache holds what the disk serves).

The token file of a snapshot and a tokenizer is `<snapshot>.tokens-<tokenizer key>.u16` (`.u32` for
vocabularies over 65,536 tokens): every document's tokens, each followed by the end-of-text token,
with `.offsets.u64` beside it (where each document starts, and the end) and a JSON sidecar written
last (its presence marks a complete file; it records the snapshot's size and modification time, so a
replaced snapshot is tokenized afresh). The files sit beside the snapshot, whose content-addressed
directory keys them by the snapshot's hash; where that directory cannot be written, in
`JobSpec.token_cache_dir` (or the job's output directory) under a name that adds the snapshot's path.
A file lock makes concurrent jobs (or the processes of one several-device job) build it once. A
pre-training tokenizer trained on the corpus's sample is kept the same way
(`<snapshot>.tokenizer-<key of its inputs>/`), so a later job with the same options starts without
training it again, and then reuses the token file too.

Blocks are cut from the training documents' token stream, held-out documents left out, exactly as
packing them in memory would: `block_size` tokens each, across document boundaries, the last
shorter piece dropped (`test_token_blocks_equal_in_memory_packing`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from training_core import language_modeling
from training_core.data_files import Problem, read_records
from training_core.events import EventWriter
from training_core.spec import JobError, JobSpec, write_json_atomic

TOKENIZER_SAMPLE_BYTES = 100 * 1024**2
"""Text a pre-training tokenizer is trained on at most (every k-th document beyond it): the merges of
one domain's vocabulary settle long before, and BPE training time grows with the text it reads."""


@dataclass(frozen=True)
class HeldOut:
    ordinals: frozenset[int]
    """Positions of the held-out documents in the corpus (its files in order, documents in file order)."""
    texts: list[str]
    """Their texts, in corpus order."""
    documents: int
    """Documents in the whole corpus."""


def documents(snapshots: list[Path], skip: Iterable[int] = (), every: int = 1) -> Iterator[str]:
    """The text of every `every`-th document of the corpus, in order, leaving out the ordinals in
    `skip`; a record that is not a text record ends the job naming its file and line."""
    skipped = frozenset(skip)
    ordinal = 0
    for path in snapshots:
        for line, record in read_records(path):
            text = _text(path, line, record)
            if ordinal not in skipped and ordinal % every == 0:
                yield text
            ordinal += 1


def hold_out(snapshots: list[Path], fraction: float, max_documents: int, seed: int) -> HeldOut:
    """`fraction` of the documents (at most `max_documents`) drawn at random with `seed`, in one pass.

    A reservoir of `max_documents` is sampled while counting (Algorithm R), then cut to the count the
    fraction asks for: a uniform subset of a uniform sample is uniform, and no second pass is read.
    With too few documents to hold any out, none is (all train; no held-out figures)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    count = 0
    for count, text in enumerate(documents(snapshots), start=1):
        if len(reservoir) < max_documents:
            reservoir.append((count - 1, text))
        else:
            slot = rng.randrange(count)
            if slot < max_documents:
                reservoir[slot] = (count - 1, text)
    wanted = min(max_documents, max(1, round(count * fraction))) if fraction > 0 else 0
    if wanted >= count:
        wanted = 0  # too few documents to hold any out
    chosen = sorted(rng.sample(reservoir, wanted))
    return HeldOut(frozenset(ordinal for ordinal, _ in chosen), [text for _, text in chosen], count)


def sample_stride(snapshots: list[Path]) -> int:
    """Every how many documents a pre-training tokenizer reads: 1 up to `TOKENIZER_SAMPLE_BYTES`."""
    total = sum(path.stat().st_size for path in snapshots)
    return max(1, math.ceil(total / TOKENIZER_SAMPLE_BYTES))


def trained_tokenizer(snapshots: list[Path], spec: JobSpec, recipe: dict[str, Any], held_out: HeldOut,
                      train: Callable[[Path], None]) -> Path:
    """The directory of the tokenizer trained on this corpus's sample with `recipe` (its options, as
    JSON): the one an earlier job left beside the first snapshot, or trained now by `train(directory)`
    and kept there. Training a tokenizer on the sample takes minutes on a large corpus, and the same
    inputs train the same tokenizer, so a later trial or rerun on the snapshot starts without it (and,
    with the same tokenizer, reuses its token file too)."""
    identity = {"snapshots": [_file_identity(path) for path in snapshots], "recipe": recipe,
                "held_out": hashlib.sha256(json.dumps(sorted(held_out.ordinals)).encode()).hexdigest(),
                "sample_bytes": TOKENIZER_SAMPLE_BYTES}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(f"{_token_file_stem(snapshots[0], spec)}.tokenizer-{key}")
    if not (directory / "tokenizer_config.json").exists():
        with _locked(Path(f"{directory}.lock")):
            if not (directory / "tokenizer_config.json").exists():  # or trained while we waited
                building = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
                shutil.rmtree(building, ignore_errors=True)
                train(building)
                building.rename(directory)  # whole or absent
    return directory


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"name": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# Token files.

@dataclass(frozen=True)
class TokenFile:
    tokens_path: Path
    offsets_path: Path
    dtype: str
    documents: int
    tokens: int

    def tokens_array(self) -> np.memmap:
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def offsets_array(self) -> np.memmap:
        return np.memmap(self.offsets_path, dtype=np.uint64, mode="r", shape=(self.documents + 1,))


def token_file(snapshot: Path, tokenizer: PreTrainedTokenizerBase, spec: JobSpec, events: EventWriter) -> TokenFile:
    """The snapshot's token file for this tokenizer: the one an earlier job left, or built now."""
    dtype = "uint16" if len(tokenizer) <= 2**16 else "uint32"
    stem = f"{_token_file_stem(snapshot, spec)}.tokens-{tokenizer_key(tokenizer)}"
    tokens_path = Path(f"{stem}.{'u16' if dtype == 'uint16' else 'u32'}")
    offsets_path, sidecar = Path(f"{stem}.offsets.u64"), Path(f"{stem}.json")
    stat = snapshot.stat()
    identity = {"snapshot": snapshot.name, "snapshot_bytes": stat.st_size, "snapshot_mtime_ns": stat.st_mtime_ns,
                "tokenizer": tokenizer_key(tokenizer), "dtype": dtype}
    existing = _complete(sidecar, identity, tokens_path, offsets_path)
    if existing is None:
        with _locked(Path(f"{stem}.lock")):
            existing = _complete(sidecar, identity, tokens_path, offsets_path)  # built while we waited?
            if existing is None:
                return _build(snapshot, tokenizer, identity, tokens_path, offsets_path, sidecar, events)
    events.message(f"reusing the token file of {snapshot.name}: {existing.documents:,} documents, "
                   f"{existing.tokens:,} tokens", path=str(tokens_path), reused=True,
                   documents=existing.documents, tokens=existing.tokens)
    return existing


def tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    """16 hex digits that change whenever the tokenizer would encode any text differently."""
    described = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast \
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)  # a slow (Python) tokenizer has no backend
    return hashlib.sha256(f"{described}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def _token_file_stem(snapshot: Path, spec: JobSpec) -> Path:
    if spec.token_cache_dir is None and os.access(snapshot.parent, os.W_OK):
        return snapshot
    root = Path(spec.token_cache_dir or Path(spec.output_dir) / "tokens")
    root.mkdir(parents=True, exist_ok=True)
    where = hashlib.sha256(str(snapshot.resolve()).encode()).hexdigest()[:12]
    return root / f"{snapshot.name}.{where}"


def _complete(sidecar: Path, identity: dict[str, Any], tokens_path: Path, offsets_path: Path) -> TokenFile | None:
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if any(recorded.get(name) != value for name, value in identity.items()):
        return None
    found = TokenFile(tokens_path, offsets_path, recorded["dtype"], recorded["documents"], recorded["tokens"])
    itemsize = np.dtype(found.dtype).itemsize
    if not (tokens_path.exists() and tokens_path.stat().st_size == found.tokens * itemsize
            and offsets_path.exists() and offsets_path.stat().st_size == (found.documents + 1) * 8):
        return None
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` for the `with` block (released by the kernel if the process dies)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(snapshot: Path, tokenizer: PreTrainedTokenizerBase, identity: dict[str, Any], tokens_path: Path,
           offsets_path: Path, sidecar: Path, events: EventWriter) -> TokenFile:
    """Tokenize the snapshot in batches straight to disk, under temporary names renamed when whole."""
    started = time.monotonic()
    dtype = np.dtype(identity["dtype"])
    backend = tokenizer.backend_tokenizer if tokenizer.is_fast else None
    if backend is not None and (backend.truncation or backend.padding):
        backend = None  # left set by an earlier call: the wrapper resets them, the backend would apply them
    suffix = f".{os.getpid()}.tmp"
    tokens_tmp, offsets_tmp = Path(f"{tokens_path}{suffix}"), Path(f"{offsets_path}{suffix}")
    tokens = documents_seen = text_bytes = 0
    try:
        with tokens_tmp.open("wb") as tokens_out, offsets_tmp.open("wb") as offsets_out, parallel_tokenizers():
            offsets_out.write(np.zeros(1, np.uint64).tobytes())
            texts = documents([snapshot])
            while batch := list(islice(texts, language_modeling.TOKENIZE_BATCH)):
                text_bytes += sum(len(text.encode("utf-8")) for text in batch)
                encoded = language_modeling.encode(tokenizer, batch, backend)
                lengths = np.fromiter((len(ids) for ids in encoded), np.uint64, len(encoded))
                np.fromiter(chain.from_iterable(encoded), dtype, int(lengths.sum())).tofile(tokens_out)
                (tokens + np.cumsum(lengths, dtype=np.uint64)).tofile(offsets_out)
                tokens += int(lengths.sum())
                documents_seen += len(batch)
        os.replace(tokens_tmp, tokens_path)
        os.replace(offsets_tmp, offsets_path)
    finally:
        tokens_tmp.unlink(missing_ok=True)
        offsets_tmp.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    built = TokenFile(tokens_path, offsets_path, dtype.name, documents_seen, tokens)
    write_json_atomic(sidecar, {**identity, "documents": documents_seen, "tokens": tokens, "text_bytes": text_bytes,
                                "seconds": round(seconds, 3)})
    events.message(
        f"tokenized {snapshot.name}: {documents_seen:,} documents, {tokens:,} tokens in {seconds:.1f} s "
        f"({text_bytes / 1e6 / seconds:.1f} MB/s, {tokens / seconds:,.0f} tokens/s)", path=str(tokens_path),
        reused=False, documents=documents_seen, tokens=tokens, text_bytes=text_bytes, seconds=seconds,
        megabytes_per_second=text_bytes / 1e6 / seconds, tokens_per_second=tokens / seconds)
    return built


@contextlib.contextmanager
def parallel_tokenizers() -> Iterator[None]:
    """Tokenize (and train tokenizers) on the job's threads, not one.

    The worker starts every job with `TOKENIZERS_PARALLELISM=false`: a process that forks after the
    tokenizers' thread pool has started can deadlock in the child. Building a token file forks
    nothing, and on two threads it runs twice as fast, so the pool is allowed for its duration,
    sized to the job's share of the machine (its torch threads, `OMP_NUM_THREADS`)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ.setdefault("RAYON_NUM_THREADS", str(torch.get_num_threads()))  # read once, when the pool starts
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


# Blocks.

class TokenBlocks(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Blocks of `block_size` tokens over the token files' documents, `skip` (corpus ordinals) left out;
    each item is `{"input_ids", "labels"}` (labels = inputs; the model shifts them)."""

    def __init__(self, files: list[TokenFile], block_size: int, skip: Iterable[int] = ()):
        self.files, self.block_size = files, block_size
        # The training stream as runs of consecutive kept documents: (file, first token, end token).
        runs: list[tuple[int, int, int]] = []
        skipped = sorted(skip)
        first_ordinal = 0
        for index, file in enumerate(files):
            offsets = file.offsets_array()
            start = 0
            for ordinal in skipped:
                local = ordinal - first_ordinal
                if 0 <= local < file.documents:
                    runs.append((index, int(offsets[start]), int(offsets[local])))
                    start = local + 1
            runs.append((index, int(offsets[start]), int(offsets[file.documents])))
            first_ordinal += file.documents
        self.runs = [run for run in runs if run[2] > run[1]]
        self.run_ends = np.cumsum([end - start for _, start, end in self.runs], dtype=np.int64)
        total = int(self.run_ends[-1]) if self.runs else 0
        if total < block_size:
            raise JobError("invalid_dataset", f"the corpus has {total} training tokens, fewer than one block of "
                           f"{block_size}; add text or lower max_seq_length", param="hyperparameters.max_seq_length")
        self.length = total // block_size
        self._arrays: list[np.memmap] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self._arrays is None:  # opened lazily: a dataloader worker maps the files itself
            self._arrays = [file.tokens_array() for file in self.files]
        position, end = index * self.block_size, (index + 1) * self.block_size
        pieces = []
        run = int(np.searchsorted(self.run_ends, position, side="right"))
        while position < end:
            file, start, stop = self.runs[run]
            run_start = int(self.run_ends[run]) - (stop - start)
            take = min(end, int(self.run_ends[run])) - position
            offset = start + position - run_start
            pieces.append(self._arrays[file][offset:offset + take])
            position += take
            run += 1
        ids = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}  # maps do not travel to another process


def _text(path: Path, line: int, record: dict[str, Any] | Problem) -> str:
    if isinstance(record, Problem):
        raise JobError("invalid_dataset", f"{path.name}: {record}", param="train_files")
    text = record.get("text")
    if not isinstance(text, str):
        raise JobError("invalid_dataset", f"{path.name} line {line}: pre-training reads text records "
                       f"({{\"text\": ...}}); this one has {', '.join(sorted(record)) or 'no fields'}",
                       param="train_files")
    return text
