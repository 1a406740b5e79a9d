"""Encoded data sets on disk: checked rows and their token ids in Arrow files, memory-mapped, and cached so the same
data is prepared once.

`prepare_data` reads every data file in chunks, checks and encodes the chunks in `data.num_proc` worker processes
(`toolkit.data.encode.RowEncoder`, the same checks and ids as the one-process path), and streams each chunk's rows to an
Arrow file as it arrives; lengths, counts and problems are gathered on the way. Memory holds the chunks in flight,
not the data set.

The result is cached under `$TOOLKIT_CACHE/data/<key>`, where the key is a digest of everything the ids depend on:
each data file's content (`sources.content_hash`), the recipe's `data` section (except `num_proc`, which changes how
fast, not what) and `train.max_seq_length`, the tokenizer (its full serialized state and chat template), the
transformers and tokenizers versions, the working directory when a data path is relative, and `ENCODER_VERSION`.
Any change is a new key, so the data is encoded again. An entry is written into a temporary folder and renamed
into place whole; reading it checks every file's size and digest and every image's size and modification time, and
an entry that fails a check is never used (it is encoded again and replaced).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data import encode, reading, sources
from toolkit.model import builtin

ENCODER_VERSION = 2  # raise whenever toolkit.data.encode or toolkit.data would give other ids, masks or rows
CHUNK_ROWS = 2000  # rows a worker checks and encodes per task
SMALL_DATA_BYTES = 2 * 2**20
SPLITS = ("train", "eval")
ENTRY_FILE = "entry.json"


def schema():
    import pyarrow as pa

    return pa.schema([
        ("source", pa.string()), ("line", pa.int64()), ("where", pa.string()), ("fields", pa.string()),
        ("input_ids", pa.list_(pa.int32())), ("completion_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())), ("image_paths", pa.list_(pa.string())),
        ("length", pa.int32()), ("status", pa.int8()), ("special", pa.int8()),
    ])


# ---- encoding in worker processes ----

WORKER: encode.RowEncoder | None = None  # set in each worker process (and in this one when num_proc is 1)


def start_worker(data_section, tokenizer, limit: int) -> None:
    global WORKER
    WORKER = encode.RowEncoder(data_section, tokenizer, limit)


@dataclass
class ChunkResult:
    records: int  # records read (good or not), to tell an empty file
    problems: list[tuple[int, str]]
    batch: object  # a pyarrow RecordBatch of the good rows, or None
    size: int


def encode_chunk(chunk: sources.Chunk) -> ChunkResult:
    """Parse, check and encode one chunk in this process; the rows come back as one Arrow batch."""
    records, problems = chunk.parsed()
    rows, row_problems = WORKER.check(records)
    problems += row_problems
    return ChunkResult(len(records), problems, to_batch(WORKER.encode(rows)) if rows else None, chunk.size)


def to_batch(items):
    """One Arrow batch from (row, encoded, fitted, status, special) items; a dropped row keeps no ids."""
    import numpy as np
    import pyarrow as pa

    columns = {name: [] for name in ("source", "line", "where", "fields", "image_paths", "length", "status",
                                     "special")}
    ids, mask, offsets = [], [], [0]
    for row, encoded, fitted, status, special in items:
        columns["source"].append(row.source)
        columns["line"].append(row.line)
        columns["where"].append(row.where or f"{row.source}:{row.line}")
        columns["fields"].append(row.text or json.dumps(row.fields, ensure_ascii=False, default=str))
        columns["image_paths"].append(list(encoded.images))
        columns["length"].append(len(encoded.input_ids))
        columns["status"].append(status)
        columns["special"].append(int(special))
        if fitted is not None:
            ids += fitted.input_ids
            mask += fitted.completion_mask
        offsets.append(len(ids))
    flat_ids = np.asarray(ids, dtype=np.int32)
    flat_mask = np.asarray(mask, dtype=np.int8)
    labels = np.where(flat_mask == 1, flat_ids, np.int32(-100)).astype(np.int32)  # TRL's rule for completion_mask
    offsets = pa.array(offsets, type=pa.int32())
    arrays = {**{k: v for k, v in columns.items()},
              "input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
              "completion_mask": pa.ListArray.from_arrays(offsets, pa.array(flat_mask)),
              "labels": pa.ListArray.from_arrays(offsets, pa.array(labels))}
    target = schema()
    return pa.record_batch([pa.array(arrays[f.name], type=f.type) if not isinstance(arrays[f.name], pa.Array)
                            else arrays[f.name] for f in target], schema=target)


def ordered_results(chunks, num_proc: int, data_section, tokenizer, limit: int):
    """ChunkResults in file order: in this process when num_proc is 1, else from a pool of forked workers with
    at most two chunks per worker in flight (reading waits for encoding, so memory stays bounded)."""
    if num_proc <= 1:
        start_worker(data_section, tokenizer, limit)
        yield from map(encode_chunk, chunks)
        return
    import multiprocessing

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; forked Rust threads deadlock
    context = multiprocessing.get_context("fork")
    with context.Pool(num_proc, initializer=start_worker, initargs=(data_section, tokenizer, limit)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def default_num_proc() -> int:
    """The CPUs this process may use (a container or `taskset` can allow fewer than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class RowsProgress:
    """A rich bar for reading, checking and encoding: bytes of the data files done, rows and rows/s; drawn only
    when the work takes more than a second."""

    def __init__(self, total_bytes: int, label: str):
        self.total, self.label, self.done, self.rows = total_bytes, label, 0, 0
        self.started = time.monotonic()
        self.progress = self.task = None

    def advance(self, size: int, rows: int) -> None:
        self.done += size
        self.rows += rows
        elapsed = time.monotonic() - self.started
        if self.progress is None and elapsed > 1:
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            from toolkit.ui.report import console

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.fields[rows]}"), TimeElapsedColumn(), console=console)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=max(self.total, 1), rows="")
        if self.progress is not None:
            rate = self.rows / max(elapsed, 1e-9)
            self.progress.update(self.task, completed=min(self.done, self.total),
                                 rows=f"{self.rows:,} rows, {rate:,.0f} rows/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=max(self.total, 1))
            self.progress.stop()


def encode_files(files: list[str], data_section, tokenizer, limit: int, num_proc: int, target: Path,
                 bar: RowsProgress) -> list[str]:
    """Check and encode every file into one Arrow stream file at `target`; returns every problem found."""
    import pyarrow as pa

    problems: list[str] = []
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, schema()) as writer:
        for path in files:
            file_problems, records = [], 0
            for result in ordered_results(sources.chunks(Path(path), CHUNK_ROWS), num_proc, data_section,
                                          tokenizer, limit):
                records += result.records
                file_problems += result.problems
                if result.batch is not None:
                    writer.write_batch(result.batch)
                bar.advance(result.size, result.records)
            if not records and not file_problems:
                file_problems.append((0, f"{path}: no rows (the file is empty)"))
            problems += [message for _, message in sorted(file_problems, key=lambda item: item[0])]
    return problems


# ---- the cache ----


def cache_root() -> Path:
    return builtin.cache_root() / "data"


def tokenizer_digest(tokenizer) -> str:
    """What the tokenizer would encode differently with: its full serialized state (vocabulary, merges, added and
    special tokens, normalizer), its chat template and its class."""
    import hashlib

    digest = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    for part in (type(tokenizer).__name__, state, str(tokenizer.chat_template),
                 json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def data_files(data_section) -> dict[str, list[str]]:
    return {"train": reading.file_list(data_section.train), "eval": reading.file_list(data_section.eval)}


def cache_key(data_section, limit: int, tokenizer) -> tuple[str, dict]:
    """The entry's name and what it was derived from (written beside the entry, for whoever looks)."""
    import hashlib

    import tokenizers
    import transformers

    files = data_files(data_section)
    section = data_section.model_dump(mode="json")
    section.pop("num_proc", None)
    relative = any(not Path(p).expanduser().is_absolute() for p in [*files["train"], *files["eval"]]) or (
        data_section.image_root and not Path(data_section.image_root).expanduser().is_absolute())
    parts = {
        "encoder_version": ENCODER_VERSION,
        "data": section,
        "max_seq_length": limit,
        "files": {split: [[p, sources.content_hash(Path(p))] for p in paths] for split, paths in files.items()},
        "tokenizer": tokenizer_digest(tokenizer),
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "cwd": str(Path.cwd()) if relative else None,
    }
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest(), parts


def file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=20)
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def image_stats(paths) -> dict[str, list[int]]:
    stats = {}
    for path in paths:
        try:
            info = os.stat(path)
            stats[path] = [info.st_size, info.st_mtime_ns]
        except OSError:
            stats[path] = [-1, -1]
    return stats


def entry_problem(folder: Path) -> str | None:
    """Why a cache entry cannot be used (None when it can): a missing or unreadable entry file, an Arrow file whose
    size or digest differ from what was written, or an image that changed since."""
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
        for name, (size, digest) in entry["files"].items():
            path = folder / name
            if path.stat().st_size != size or file_digest(path) != digest:
                return f"{name} differs from what was written"
        if image_stats(entry["images"]) != entry["images"]:
            return "an image file changed"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable ({err})"
    return None


@dataclass
class Store:
    """The encoded rows of data.train and data.eval files, and how they were obtained."""

    folder: Path
    tables: dict  # split -> pyarrow Table, memory-mapped
    hit: bool
    note: str


def open_table(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all()


def open_entry(folder: Path) -> dict:
    return {split: open_table(folder / f"{split}.arrow") for split in SPLITS}


def unique_images(tables: dict) -> list[str]:
    import pyarrow.compute as pc

    paths = set()
    for table in tables.values():
        flat = pc.list_flatten(table["image_paths"])
        if len(flat):  # to_pylist imports pandas, a second that text-only data need not spend
            paths.update(pc.unique(flat).to_pylist())
    return sorted(paths)


def prepare_data(data_section, tokenizer, limit: int) -> Store:
    """The encoded data of this recipe: from the cache when an intact entry has the same key, else encoded now
    (every problem of every file raised at once, nothing cached) and cached."""
    started = time.monotonic()
    key, parts = cache_key(data_section, limit, tokenizer)
    folder = cache_root() / key
    damaged = None
    if folder.exists():
        damaged = entry_problem(folder)
        if damaged is None:
            tables = open_entry(folder)
            rows = sum(t.num_rows for t in tables.values())
            return Store(folder, tables, True, f"from the cache (entry {key[:12]}): {rows:,} rows, checked and "
                                               f"opened in {time.monotonic() - started:.1f} s")
    tables = encode_to(folder, key, parts, data_section, tokenizer, limit)
    seconds = time.monotonic() - started
    rows = sum(t.num_rows for t in tables.values())
    done = f"{rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)"
    note = f"encoded now: {done}, cached (entry {key[:12]})" if damaged is None else \
        f"encoded again: cache entry {key[:12]} was damaged ({damaged}); {done}, replaced"
    return Store(folder, tables, False, note)


def encode_to(folder: Path, key: str, parts: dict, data_section, tokenizer, limit: int) -> dict:
    """Encode into a temporary folder beside the entry and rename it into place; a damaged entry is replaced."""
    files = data_files(data_section)
    total = sum(os.path.getsize(p) for p in [*files["train"], *files["eval"]] if Path(p).is_file())
    # Starting workers costs about a second; below SMALL_DATA_BYTES one process is done sooner, unless the recipe
    # asks for more.
    num_proc = data_section.num_proc or (default_num_proc() if total >= SMALL_DATA_BYTES else 1)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.parent / f".partial-{key}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)  # only ever made by this process id for this key
    scratch.mkdir()
    try:
        bar = RowsProgress(total, "preparing data")
        problems = []
        try:
            for split in SPLITS:
                problems += encode_files(files[split], data_section, tokenizer, limit, num_proc,
                                         scratch / f"{split}.arrow", bar)
        finally:
            bar.close()
        reading.raise_problems(problems, "data")
        written = {f"{split}.arrow": [(scratch / f"{split}.arrow").stat().st_size,
                                      file_digest(scratch / f"{split}.arrow")] for split in SPLITS}
        tables = open_entry(scratch)
        entry = {"key": key, "made_from": parts, "files": written, "images": image_stats(unique_images(tables)),
                 "rows": {split: tables[split].num_rows for split in SPLITS}}
        write_synced(scratch / ENTRY_FILE, json.dumps(entry, ensure_ascii=False, indent=1))
        for name in written:
            sync(scratch / name)
        install(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return open_entry(folder)


def sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def install(scratch: Path, folder: Path) -> None:
    """Put the finished entry in place in one rename. A damaged entry (the toolkit's own) is moved aside and removed
    first; an intact one another process installed meanwhile is kept and ours discarded."""
    if folder.exists():
        if entry_problem(folder) is None:
            return
        aside = folder.parent / f".damaged-{folder.name}-{os.getpid()}"
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(scratch, folder)
    except OSError:
        if not (folder.exists() and entry_problem(folder) is None):
            raise


# ---- views of the stored rows ----


def pc_list_lengths(column):
    import pyarrow.compute as pc

    return pc.list_value_length(column)


def as_numpy(column, dtype):
    """A column of fixed-width numbers without nulls as one numpy array, read from its Arrow buffers (pyarrow's own
    `to_numpy` imports pandas, a second of `validate`'s time)."""
    import numpy as np

    dtype = np.dtype(dtype)
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    parts = [np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c), offset=c.offset * dtype.itemsize)
             for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


class TableRows(Sequence):
    """Rows of an Arrow table at the given indices, made into Python objects only when read."""

    BATCH = 1024

    def __init__(self, table, indices, make):
        self.table, self.indices, self.make = table, indices, make

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self.make(r) for r in self.table.take(self.indices[item]).to_pylist()]
        return self.make(self.table.take([self.indices[item]]).to_pylist()[0])

    def __iter__(self):
        for start in range(0, len(self.indices), self.BATCH):
            yield from self[start : start + self.BATCH]

    def __add__(self, other) -> list:
        """Concatenation as lists give it (`train.examples + eval.examples`)."""
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)


def as_row(record: dict) -> reading.Row:
    return reading.Row(record["source"], record["line"], json.loads(record["fields"]), record["where"])


def as_example(record: dict) -> encode.Encoded:
    return encode.Encoded(record["input_ids"], record["completion_mask"], tuple(record["image_paths"]))


@dataclass
class StoredEncoding:
    """One split's rows in a memory-mapped table: what `encode.Encoding` holds, read from Arrow columns on demand."""

    table: object
    indices: object  # numpy array: this split's rows of the table, in order
    special_examples: list[str] = field(default_factory=list)

    def __post_init__(self):
        import numpy as np

        status = as_numpy(self.table["status"], np.int8)[self.indices]
        self.status = status
        self.kept = self.indices[status <= encode.CUT]
        self.lengths = as_numpy(self.table["length"], np.int32)[self.indices]
        self.kept_lengths = self.lengths[status <= encode.CUT]
        self.truncated = int((status == encode.CUT).sum())
        self.dropped_long = int((status == encode.DROPPED_LONG).sum())
        self.dropped_empty = int((status == encode.DROPPED_EMPTY).sum())
        self.dropped_image = int((status == encode.DROPPED_IMAGE).sum())
        special = as_numpy(self.table["special"], np.int8)[self.indices]
        self.special_rows = int(np.sum(special))
        if self.special_rows:
            first = self.indices[np.flatnonzero(special)[:10]]
            self.special_text = self.table["where"].take(first).to_pylist()
        else:
            self.special_text = []
        self.rows = TableRows(self.table, self.kept, as_row)
        self.all_rows = TableRows(self.table, self.indices, as_row)
        self.examples = TableRows(self.table, self.kept, as_example)

    @property
    def dropped(self) -> int:
        return self.dropped_long + self.dropped_empty + self.dropped_image

    @property
    def trained_lengths(self):
        """Token counts of the kept rows as trained (after any cut)."""
        import pyarrow.compute as pc

        return as_numpy(pc.list_value_length(self.table["input_ids"]), "int32")[self.kept]

    @property
    def image_flags(self):
        import pyarrow.compute as pc

        return as_numpy(pc.list_value_length(self.table["image_paths"]), "int32")[self.kept] > 0

    @property
    def image_rows(self) -> int:
        return int(self.image_flags.sum()) if len(self.kept) else 0

    @property
    def max_images(self) -> int:
        counts = as_numpy(pc_list_lengths(self.table["image_paths"]), "int32")[self.kept]
        return int(counts.max()) if len(counts) else 0

    @property
    def images_total(self) -> int:
        import pyarrow.compute as pc

        return int(as_numpy(pc.list_value_length(self.table["image_paths"]), "int32")[self.kept].sum())

    def dataset(self, order=None):
        """The kept rows (in `order`, indices into them) as a `datasets.Dataset` over the memory-mapped table, with
        the columns TRL reads (`input_ids`, `labels`, `completion_mask`) and `image_paths` when a row has an image.
        Built in memory, so nothing (no cache or index file) is ever written into the entry."""
        import numpy as np
        from datasets import Dataset
        from datasets.table import InMemoryTable

        columns = ["input_ids", "completion_mask", "labels"] + (["image_paths"] if self.image_rows else [])
        indices = self.kept if order is None else self.kept[np.asarray(order, dtype=np.int64)]
        return Dataset(InMemoryTable(self.table.select(columns))).select(indices)


def split_encodings(store: Store, data_section, seed: int) -> tuple[StoredEncoding, StoredEncoding]:
    """Train and eval encodings; with data.eval_fraction the held-out rows are picked exactly as `reading.split_rows`
    picks them (the same seed gives the same rows)."""
    import numpy as np

    train, evals = store.tables["train"], store.tables["eval"]
    if data_section.eval_fraction > 0:
        held = reading.held_out(train.num_rows, data_section.eval_fraction, seed)
        keep = np.ones(train.num_rows, dtype=bool)
        keep[held] = False
        return (StoredEncoding(train, np.flatnonzero(keep)), StoredEncoding(train, np.flatnonzero(~keep)))
    return (StoredEncoding(train, np.arange(train.num_rows)), StoredEncoding(evals, np.arange(evals.num_rows)))
