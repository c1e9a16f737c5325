"""Prompt datasets for RL post-training: JSONL / JSON / Parquet files, on-disk HF datasets, built-in tasks.

A training step consumes a batch of *prompts* (section 2 of the design): :class:`PromptDataModule` yields
``{"prompt": [B strings], "answer": [B values], ...}``, one list per dataset column. The trainer tokenises the
prompts (after :func:`format_prompts`) and passes every other column to the reward functions as keyword
arguments.

Every mistake in the data is reported as a one-line :class:`DataError` (a ``ValueError``) that names the config
key and the file and line (or row) at fault, raised at construction or in :meth:`PromptDataModule.setup`,
before any model is loaded.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from drpo_lightning.errors import UserError

__all__ = [
    "DataError",
    "EpochShuffleSampler",
    "PromptDataLoader",
    "PromptDataModule",
    "PromptDataset",
    "collate_prompts",
    "format_prompts",
    "load_rows",
    "prompt_token_counter",
    "split_train_val",
]

Row = dict[str, Any]
_SUFFIXES = (".jsonl", ".json", ".parquet")
_HF_VAL_SPLITS = ("validation", "valid", "val", "test")
RESERVED_COLUMNS = ("prompts", "completions")
"""Keyword arguments of every reward call: a dataset column of the same name could not be passed."""
DATA_INSTALL_HINT = 'pip install "drpo-lightning[data]"'
PROGRESS_AFTER_S = 5.0
"""A pass over the data that takes longer than this prints how far it has got, every this many seconds."""
_PROGRESS_EVERY = 4096  # rows between two looks at the clock


class DataError(UserError):
    """A problem with the prompt data, explained in one line (config key, file:line or row, what is wrong)."""


# --------------------------------------------------------------------------------------------------- loading


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _Progress:
    """Prints ``drpo: <what>: N rows (T s)`` to stderr (rank 0 only) while a pass over the data is running,
    once it has run for :data:`PROGRESS_AFTER_S` seconds: a big file is then not mistaken for a hang."""

    def __init__(self, what: str, every: int | None = None) -> None:
        self.what, self.every = what, every or _PROGRESS_EVERY
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        if not done or done % self.every:
            return
        now = time.monotonic()
        if now - self.last < PROGRESS_AFTER_S:
            return
        self.last = now
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) == 0:
            print(f"drpo: {self.what}: {done:,} rows ({now - self.start:.0f} s)", file=sys.stderr, flush=True)


def _read_jsonl(path: Path) -> tuple[list[Any], Callable[[int], str]]:
    """Rows of a JSON Lines file; blank lines are skipped. Errors name ``file:line``."""
    rows: list[Any] = []
    lines: list[int] = []
    offset = 0
    progress, every = _Progress(f"reading {path}"), _PROGRESS_EVERY
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not lineno % every:
                progress(lineno)
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {offset + err.start} of the file, "
                    f"{raw[err.start : err.start + 4]!r}); save the file as UTF-8"
                ) from None
            offset += len(raw)
            if not text.strip():
                continue
            try:
                # Without the line break, an unterminated value is reported at its own line's column.
                rows.append(json.loads(text.rstrip("\r\n")))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            except (ValueError, RecursionError) as err:  # an integer of > 4300 digits; nesting too deep
                raise DataError(f"{path}:{lineno}: invalid JSON: {_first_line(err)}") from None
            lines.append(lineno)
    return rows, lambda i: f"{path}:{lines[i]}"


def _read_json(path: Path) -> tuple[list[Any], Callable[[int], str]]:
    """A JSON array of objects; a file of one JSON object per line is read as JSON Lines."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        lineno = data.count(b"\n", 0, start) + 1
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 (byte {start} of the file, {data[start : start + 4]!r}); "
            "save the file as UTF-8"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines with a .json suffix
            return _read_jsonl(path)
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer of > 4300 digits; nesting too deep
        raise DataError(f"{path}: invalid JSON: {_first_line(err)}") from None
    if isinstance(value, dict):  # a single object is a one-row dataset
        value = [value]
    if not isinstance(value, list):
        raise DataError(
            f"{path}: expected a JSON array of objects or JSON Lines, got a {type(value).__name__}"
        )
    return value, lambda i: f"{path} row {i}"


def _read_parquet(path: Path) -> tuple[list[Any], Callable[[int], str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{path}: reading Parquet needs pyarrow: {DATA_INSTALL_HINT}") from err
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet: {_first_line(err)}") from None
    return rows, lambda i: f"{path} row {i}"


def _is_saved_hf(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_hf(path: Path, key: str, prefer_val: bool) -> tuple[list[Any], Callable[[int], str], Any]:
    """A ``save_to_disk`` folder. Returns rows, locator and (for a DatasetDict) the held-out split or None."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{key}: {path} is a saved HF dataset; reading it needs datasets: {DATA_INSTALL_HINT}"
        ) from err
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{key}: cannot load HF dataset {path}: {_first_line(err)}") from None
    held_out = None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        order = ("validation", "valid", "val", "test", "train") if prefer_val else ("train",)
        chosen = next((s for s in order if s in loaded), splits[0] if len(splits) == 1 else None)
        if chosen is None:
            raise DataError(f"{key}: {path} has splits {splits} and none is called 'train'")
        if not prefer_val:
            held_name = next((s for s in _HF_VAL_SPLITS if s in loaded), None)
            if held_name is not None:
                held_out = (loaded[held_name].to_list(), _hf_locator(path, held_name))
        return loaded[chosen].to_list(), _hf_locator(path, chosen), held_out
    return loaded.to_list(), _hf_locator(path, None), None


def _hf_locator(path: Path, split: str | None) -> Callable[[int], str]:
    where = f"{path}[{split}]" if split else str(path)
    return lambda i: f"{where} row {i}"


def _read_file(path: Path, key: str) -> tuple[list[Any], Callable[[int], str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{key}: unsupported file type {path.name!r}; use .jsonl, .json, .parquet or a folder saved with "
        "datasets.Dataset.save_to_disk"
    )


def load_rows(
    path: str | os.PathLike[str], *, key: str = "data.path", prefer_val: bool = False
) -> tuple[list[Any], Callable[[int], str], Any]:
    """Read the raw rows at ``path``.

    ``path`` is a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder written by ``save_to_disk`` (a Dataset or
    a DatasetDict), or a folder of ``.jsonl`` / ``.json`` / ``.parquet`` shards (read in name order).

    Returns ``(rows, where, held_out)``: ``where(i)`` describes row ``i`` for error messages (``file:line`` or
    ``file row i``); ``held_out`` is ``(rows, where)`` of a DatasetDict's validation/test split when reading a
    training set (``prefer_val=False``), else None. With ``prefer_val=True`` a DatasetDict's validation split is
    read (falling back to test, then train). ``key`` is the config key named in errors.
    """
    rows, where, held_out, _ = _load(path, key, prefer_val)
    return rows, where, held_out


def _load(
    path: str | os.PathLike[str], key: str, prefer_val: bool
) -> tuple[list[Any], Callable[[int], str], Any, list[tuple[Path, int, int]]]:
    """:func:`load_rows`, plus the ``(file, first row, end row)`` of each shard when ``path`` is a folder of
    shards (else an empty list)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DataError(f"{key}: file not found: {p}")
    if p.is_file():
        rows, where = _read_file(p, key)
        return rows, where, None, []
    if _is_saved_hf(p):
        return (*_read_hf(p, key, prefer_val), [])
    shards = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _SUFFIXES)
    if not shards:
        raise DataError(
            f"{key}: folder {p} is neither a saved HF dataset (save_to_disk) nor holds .jsonl/.json/.parquet files"
        )
    rows, spans, bounds = [], [], []
    for shard in shards:
        shard_rows, shard_where = _read_file(shard, key)
        spans.append((len(rows), shard_where))
        bounds.append((shard, len(rows), len(rows) + len(shard_rows)))
        rows.extend(shard_rows)

    def where(i: int) -> str:
        start, shard_where = next(s for s in reversed(spans) if s[0] <= i)
        return shard_where(i - start)

    return rows, where, None, bounds


def _check_shard_columns(
    rows: Sequence[Row], where: Callable[[int], str], shards: Sequence[tuple[Path, int, int]]
) -> None:
    """Every shard of a folder must have the same columns (the union over its rows), as for a HF dataset: a
    shard with a renamed or missing column would otherwise only fail when one of its rows is drawn."""
    if len(shards) < 2:
        return
    columns = [set().union(*rows[start:end]) for _, start, end in shards]
    first, first_columns = shards[0][0], columns[0]
    for (shard, start, end), names in zip(shards[1:], columns[1:]):
        if names == first_columns:
            continue
        missing, extra = sorted(first_columns - names), sorted(names - first_columns)
        # Point at the first row that shows the difference: one with an extra column, else the shard's first.
        at = next((i for i in range(start, end) if extra and extra[0] in rows[i]), start)
        diff = "; ".join(part for part in (
            f"no {', '.join(map(repr, missing))}" if missing else "",
            f"extra {', '.join(map(repr, extra))}" if extra else "") if part)
        raise DataError(
            f"{where(at)}: the shards of {shard.parent} have different columns: {shard.name} has "
            f"{sorted(names)}, {first.name} has {sorted(first_columns)} ({diff}); give every shard the same columns"
        )


def _normalise(
    rows: Sequence[Any],
    where: Callable[[int], str],
    prompt_column: str,
    key: str,
    required: dict[str, list[str]] | None = None,
) -> list[Row]:
    """Check every row and return items ``{"prompt": str, **other columns}``.

    ``required`` maps each column the reward functions read to the names of the rewards that read it: a row
    without one of them fails here, before training, instead of when the row is drawn.
    """
    items: list[Row] = []
    dropped_prompt = False
    required = {c: r for c, r in (required or {}).items() if c not in ("prompt", prompt_column)}
    progress, every = _Progress(f"checking {key}"), _PROGRESS_EVERY
    for i, row in enumerate(rows):
        if not i % every:
            progress(i)
        if not isinstance(row, dict):
            raise DataError(
                f"{where(i)}: expected an object with a {prompt_column!r} field, got {type(row).__name__}"
            )
        if prompt_column not in row:
            raise DataError(
                f"{where(i)}: no {prompt_column!r} column (data.prompt_column); available columns: {list(row)}"
            )
        prompt = row[prompt_column]
        if not isinstance(prompt, str):
            raise DataError(
                f"{where(i)}: {prompt_column!r} must be a string, got {type(prompt).__name__} "
                f"{_short(prompt)} (data.prompt_column)"
            )
        if not prompt.strip():
            raise DataError(f"{where(i)}: {prompt_column!r} is empty")
        if "prompts" in row or "completions" in row:
            for name in RESERVED_COLUMNS:
                if name in row and name != prompt_column:
                    raise DataError(
                        f"{where(i)}: column {name!r} clashes with the {name!r} argument every reward function "
                        "is called with; rename the column"
                    )
        for name, readers in required.items():
            if name not in row:
                raise DataError(
                    f"{where(i)}: no {name!r} column, which reward {', '.join(map(repr, readers))} reads; "
                    f"columns of this row: {list(row)}"
                )
        item: Row = {"prompt": prompt}
        for name, value in row.items():
            if name == prompt_column:
                continue
            if name == "prompt":  # prompt_column is another column: the dataset's own "prompt" is replaced
                dropped_prompt = True
                continue
            item[name] = value
        items.append(item)
    if dropped_prompt:
        warnings.warn(
            f"data.prompt_column={prompt_column!r}: the dataset's own 'prompt' column is ignored ({key})",
            stacklevel=3,
        )
    return items


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_train_val(items: Sequence[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split ``items`` into training and held-out rows, deterministically given ``seed``.

    Rows are grouped by prompt text, so a prompt that occurs several times lands wholly on one side and
    never leaks from training into validation. Distinct prompts are taken in a random order (a torch
    generator seeded with ``seed``) into the held-out side until it holds ``round(len(items) * val_fraction)``
    rows (at least one when ``val_fraction > 0``; never all of them). Both sides keep the file order.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    target = round(len(items) * val_fraction)
    if val_fraction > 0:
        target = max(target, 1)
    if target == 0 or len(items) < 2:
        return list(items), []
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item["prompt"], []).append(i)
    keys = list(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    held: set[int] = set()
    for k in order:
        members = groups[keys[k]]
        if len(held) + len(members) >= len(items):  # keep at least one training row
            continue
        held.update(members)
        if len(held) >= target:
            break
    train = [item for i, item in enumerate(items) if i not in held]
    val = [item for i, item in enumerate(items) if i in held]
    return train, val


def _locator(
    items: Sequence[Row], where: Callable[[int], str], source: Sequence[Row] | None
) -> Callable[[int], str]:
    """``where`` for ``items[i]``, which is ``source[j]`` for some ``j`` (``source`` None: ``items`` itself):
    rows keep their file location through the held-out split and ``max_prompts``."""
    if source is None or source is items:
        return where
    index: dict[int, int] | None = None

    def locate(i: int) -> str:
        nonlocal index
        if index is None:  # built on the first error only
            index = {id(item): j for j, item in enumerate(source)}
        return where(index[id(items[i])])

    return locate


# ------------------------------------------------------------------------------------------ dataset & loader


class PromptDataset(Dataset):
    """Map-style dataset of prompt rows; item ``i`` is a (shallow) copy of ``{"prompt": str, **columns}``."""

    def __init__(self, items: Sequence[Row]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Row:
        return dict(self.items[index])


def collate_prompts(items: Sequence[Row]) -> dict[str, list[Any]]:
    """Turn B rows into one dict of columns: ``{"prompt": [B strings], "answer": [B values], ...}``.

    Columns keep the order in which they first appear; a row missing a column contributes ``None``.
    """
    names: dict[str, None] = {}
    for item in items:
        names.update(dict.fromkeys(item))
    return {name: [item.get(name) for item in items] for name in names}


class EpochShuffleSampler(DistributedSampler):
    """Random order per epoch, a pure function of ``(seed, epoch)``, optionally sharded across ranks.

    The global order of an epoch is ``randperm(num_items)`` from a generator seeded with ``(seed, epoch)``
    (identity without ``shuffle``), cut to a multiple of ``num_replicas``. Rank ``r`` takes positions
    ``r, r + W, r + 2W, ...`` of it. With a per-rank batch of ``B`` prompts, step ``k`` of the ``W`` ranks
    together therefore covers global positions ``[k*W*B, (k+1)*W*B)``: exactly the batch a single process with
    batch size ``W*B`` sees at step ``k``, so a multi-rank run sees the same prompts per step as one process.

    It subclasses :class:`~torch.utils.data.DistributedSampler` only so that Lightning does not wrap it in its
    own ``DistributedSamplerWrapper``: that wrapper shuffles the positions once more (``shuffle=True`` for every
    training loader, seeded from ``PL_GLOBAL_SEED``) before taking ``rank::W``, so the union of the ranks'
    batches at a step would *not* be the single-process batch.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed at an epoch boundary sees
    exactly the order an uninterrupted run would see; :meth:`resume_at` makes the next iteration start
    mid-epoch (see :class:`PromptDataLoader`).
    """

    def __init__(
        self, num_items: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochShuffleSampler: invalid rank {rank} of num_replicas={num_replicas}")
        # DistributedSampler.__init__ is not called: it wants a dataset and may query torch.distributed.
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = True
        self.num_samples = num_items // num_replicas
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self._start: tuple[int, int] | None = None  # (epoch, first position of this rank's share)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Make the next iteration, if it is of epoch ``epoch``, start at ``position`` of this rank's share."""
        self._start = (epoch, position)

    def __len__(self) -> int:
        return self.num_samples

    def global_order(self) -> list[int]:
        """The epoch's order of all items (before sharding)."""
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self):
        mine = self.global_order()[: self.total_size][self.rank :: self.num_replicas]
        start = 0
        if self._start is not None:
            epoch, position = self._start
            self._start = None
            if epoch == self.epoch:
                start = position
        return iter(mine[start:])


class PromptDataLoader(DataLoader):
    """A DataLoader whose position within an epoch is saved in checkpoints and restored on resume.

    Lightning saves ``state_dict()`` of every training loader that has one (``fit_loop`` -> ``combined_loader``
    in the checkpoint) and calls ``load_state_dict`` on resume before iterating. The state is ``{"epoch",
    "batches"}``: the sampler's epoch and the batches this rank has drawn from it. On resume the first
    iteration of that epoch skips those batches: an :class:`EpochShuffleSampler` skips the indices without
    loading anything; any other sampler's batches are drawn and dropped. A checkpoint taken after the last
    batch of an epoch resumes at the start of the next epoch.
    """

    _position: tuple[int, int] = (0, 0)
    _pending: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self):
        return self._iterate()

    def _iterate(self):
        # A generator: this runs at the first next(), after Lightning has called set_epoch.
        sampler = self.sampler
        epoch = int(getattr(sampler, "epoch", 0))
        skip = 0
        if self._pending is not None:
            saved_epoch, saved_batches = self._pending
            self._pending = None
            if saved_epoch == epoch and 0 < saved_batches < len(self):
                skip = saved_batches
        drop = skip
        if skip and isinstance(sampler, EpochShuffleSampler) and self.batch_size is not None:
            sampler.resume_at(epoch, skip * self.batch_size)
            drop = 0
        self._position = (epoch, skip)
        iterator = super().__iter__()
        for _ in range(drop):
            next(iterator)
        for batch in iterator:
            self._position = (epoch, self._position[1] + 1)
            yield batch


# ------------------------------------------------------------------------------------------------- prompts


def format_prompts(
    tokenizer: Any, prompts: Sequence[str], chat_template: bool | None, system_prompt: str | None = None
) -> list[str]:
    """The text the policy sees for each prompt.

    With the chat template (``chat_template=True``, or ``None`` when the tokenizer has one), each prompt
    becomes a user message, preceded by a system message when ``system_prompt`` is given, rendered by
    ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``. Without it the
    prompts are returned unchanged, except that a ``system_prompt`` is put in front of each (followed by a
    blank line) rather than silently dropped.

    Raises:
        DataError: ``chat_template=True`` but the tokenizer has no chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = has_template if chat_template is None else chat_template
    if use and not has_template:
        raise DataError(
            "data.chat_template=true but the tokenizer has no chat template; set data.chat_template to null or false"
        )
    if not use:
        if system_prompt:
            return [f"{system_prompt}\n\n{p}" for p in prompts]
        return list(prompts)
    out = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


_SPECIAL_TOKEN_MARGIN = 8
"""Tokens a tokenizer may add that no byte of the text accounts for (BOS/EOS, a SentencePiece word prefix)."""


def prompt_token_counter(
    tokenizer: Any, chat_template: bool | None, system_prompt: str | None = None, *, cap: int | None = None
) -> Callable[[list[str]], list[int]]:
    """A function giving the length in tokens of each prompt as the trainer feeds it to the policy (after
    :func:`format_prompts`; a rendered chat template already holds its special tokens), for
    :meth:`PromptDataModule.check_prompt_lengths`.

    With ``cap``, a prompt that cannot be longer than ``cap`` tokens is not tokenized: every token of a
    byte-level or byte-fallback tokenizer covers at least one byte of the text, so its UTF-8 length plus a
    small margin bounds its token count, and that bound is returned instead. Tokenizing a million prompts
    takes minutes; most prompts are far below the limit, so only those near it are tokenized.
    """
    templated = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template

    def count(prompts: list[str]) -> list[int]:
        texts = format_prompts(tokenizer, prompts, chat_template, system_prompt)
        lengths = [len(text.encode("utf-8")) + _SPECIAL_TOKEN_MARGIN for text in texts]
        exact = [i for i, n in enumerate(lengths) if cap is None or n > cap]
        if exact:
            encoded = tokenizer([texts[i] for i in exact], add_special_tokens=not templated)["input_ids"]
            for i, ids in zip(exact, encoded):
                lengths[i] = len(ids)
        return lengths

    return count


# --------------------------------------------------------------------------------------------- datamodule


class PromptDataModule(LightningDataModule):
    """Prompts for RL training, from a file, a saved HF dataset or a built-in task.

    A batch is a dict of columns, ``{"prompt": [batch_size strings], "answer": [...], ...}``; every column other
    than the prompt is passed to the reward functions as a keyword argument of the same name. Data errors are
    raised as one-line :class:`DataError` messages at construction or in ``setup()``, before any model loads.

    Training order is shuffled per epoch from ``(seed, epoch)`` and training batches are always full
    (``drop_last``). With several data-parallel ranks each rank takes every W-th prompt of that order (see
    :class:`EpochShuffleSampler`), so W ranks with ``batch_size`` B see, step for step, the prompts one process
    with batch size W*B would see. The loader's position is saved in checkpoints: a run resumed mid-epoch
    continues with the next unseen batch (see :class:`PromptDataLoader`).

    Args:
        path: Training prompts: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder written by
            ``datasets.Dataset.save_to_disk`` (for a DatasetDict, the ``train`` split, and its
            ``validation``/``test`` split as the held-out set when no ``val_path`` is given), or a folder of
            such files. Exactly one of ``path`` and ``task`` must be set.
        task: A registered task instead of a file: ``arithmetic``, or ``name:arg`` such as
            ``reasoning_gym:chain_sum`` (needs the drpo-reasoning-gym plugin:
            ``pip install ./plugins/drpo-reasoning-gym``). See ``drpo_lightning.tasks``.
        task_size: Number of training prompts the task generates.
        task_kwargs: Options of the task, e.g. ``{max_operand: 100, operations: ["+", "-"]}`` for
            ``arithmetic``, or the reasoning-gym dataset's config options.
        prompt_column: Column holding the prompt text; it reaches the trainer as ``prompt``.
        val_path: Held-out prompts, in any form ``path`` accepts. Overrides the split below and a task's own
            held-out set.
        val_fraction: Share of the training file held out for validation when there is no ``val_path``, in
            [0, 1); 0 turns validation off. The split is deterministic given ``seed``, and rows with the same
            prompt stay on the same side. Not used with ``task``.
        val_size: Number of held-out prompts a task generates (disjoint from its training prompts).
        batch_size: Prompts per training step *per data-parallel rank* (each is sampled several times by the
            rollout); the global batch is ``batch_size * number of ranks``.
        val_batch_size: Prompts per validation batch.
        seed: Seed of the held-out split, of the task generation and of the shuffling.
        shuffle: Shuffle the training prompts every epoch.
        num_workers: DataLoader worker processes (0 loads in the main process; prompts are cheap).
        max_prompts: Keep only the first this-many training prompts (after the held-out split); for smoke tests.
        chat_template: Whether the trainer wraps each prompt in the tokenizer's chat template as a user message.
            None: use the template when the tokenizer has one; true: require it; false: feed raw prompts.
        system_prompt: Optional system message put before each prompt (with the chat template, as a system
            message; without it, as text followed by a blank line).
    """

    def __init__(
        self,
        path: str | None = None,
        task: str | None = None,
        task_size: int = 10000,
        task_kwargs: dict[str, Any] | None = None,
        prompt_column: str = "prompt",
        val_path: str | None = None,
        val_fraction: float = 0.05,
        val_size: int = 500,
        batch_size: int = 8,
        val_batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        max_prompts: int | None = None,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        if (path is None) == (task is None):
            raise DataError(
                "set exactly one of data.path (a prompt file or dataset folder) and data.task (a built-in task), "
                f"got data.path={path!r} and data.task={task!r}"
            )
        required = {"batch_size": batch_size, "val_batch_size": val_batch_size, "val_fraction": val_fraction,
                    "task_size": task_size, "val_size": val_size, "num_workers": num_workers, "seed": seed}
        for name, value in required.items():
            if value is None:  # a YAML `key: null` reaches here for a non-optional number
                raise DataError(f"data.{name} must be a number, got null")
        checks = [
            (batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}"),
            (val_batch_size >= 1, f"data.val_batch_size must be >= 1, got {val_batch_size}"),
            (0 <= val_fraction < 1, f"data.val_fraction must be in [0, 1), got {val_fraction}"),
            (task_size >= 1, f"data.task_size must be >= 1, got {task_size}"),
            (val_size >= 0, f"data.val_size must be >= 0, got {val_size}"),
            (num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}"),
            (
                max_prompts is None or max_prompts >= 1,
                f"data.max_prompts must be >= 1 or null, got {max_prompts}",
            ),
            (bool(prompt_column), "data.prompt_column must be a non-empty column name"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)
        if task_kwargs is not None and not isinstance(task_kwargs, dict):
            raise DataError(f"data.task_kwargs must be a mapping, got {type(task_kwargs).__name__}")
        self.path = path
        self.task = task
        self.task_size = task_size
        self.task_kwargs = dict(task_kwargs or {})
        self.prompt_column = prompt_column
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.val_size = val_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.max_prompts = max_prompts
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.train_dataset: PromptDataset | None = None
        self.val_dataset: PromptDataset | None = None
        self.required_columns: dict[str, list[str]] = {}
        """Columns every row must have -> who reads them, beyond those the attached module's rewards declare."""
        self._where: dict[str, Callable[[int], str]] = {}
        self._lengths_checked = False

    # -- loading -------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load and check every prompt row (idempotent; every rank loads the same data).

        Besides the rows' own shape, each row must hold the columns the reward functions read
        (:attr:`required_columns`, plus those declared by the rewards of the attached ``RLModule``), and no
        column may be called ``prompts`` or ``completions``; the shards of a folder must share their columns.
        A mistake is a one-line :class:`DataError` naming ``file:line``, raised before any model weights load.
        """
        if self.train_dataset is not None:
            return
        required = self._required_columns()
        if self.task is not None:
            from drpo_lightning.tasks import build_task

            train_rows, val_rows = build_task(
                self.task,
                train_size=self.task_size,
                val_size=0 if self.val_path is not None else self.val_size,
                seed=self.seed,
                **self.task_kwargs,
            )
            def task_where(i: int) -> str:
                return f"task {self.task} row {i}"

            train = _normalise(train_rows, task_where, "prompt", "data.task", required)
            val = _normalise(val_rows, task_where, "prompt", "data.task", required) if val_rows else []
            train_where = val_where = (task_where, None)
        else:
            rows, where, held_out, shards = _load(self.path, "data.path", False)
            if not rows:
                raise DataError(f"data.path: no rows in {self.path}")
            items = _normalise(rows, where, self.prompt_column, "data.path", required)
            _check_shard_columns(rows, where, shards)
            del rows
            train_where = val_where = (where, items)
            if self.val_path is not None:
                train, val = items, []
            elif held_out is not None:
                train = items
                val = (
                    _normalise(held_out[0], held_out[1], self.prompt_column, "data.path", required)
                    if held_out[0]
                    else []
                )
                val_where = (held_out[1], val)
            else:
                train, val = split_train_val(items, self.val_fraction, self.seed)
        if self.val_path is not None:
            rows, where, _, shards = _load(self.val_path, "data.val_path", True)
            if not rows:
                raise DataError(f"data.val_path: no rows in {self.val_path}")
            val = _normalise(rows, where, self.prompt_column, "data.val_path", required)
            _check_shard_columns(rows, where, shards)
            val_where = (where, val)
        if self.max_prompts is not None:
            train = train[: self.max_prompts]
        if len(train) < self.batch_size:
            source = f"data.path={self.path}" if self.path is not None else f"data.task={self.task}"
            raise DataError(
                f"{source}: only {len(train)} training prompts, fewer than data.batch_size={self.batch_size} "
                "(training batches are always full); lower data.batch_size or add prompts"
            )
        self.train_dataset = PromptDataset(train)
        self.val_dataset = PromptDataset(val)
        self._where = {"train": _locator(train, *train_where), "val": _locator(val, *val_where)}

    def _required_columns(self) -> dict[str, list[str]]:
        """Columns every row must have -> the rewards that read them: :attr:`required_columns` and the
        ``required_columns`` each reward of the attached module declares (Lightning attaches the module
        before it sets the data up)."""
        required = {name: list(readers) for name, readers in self.required_columns.items()}
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        for reward in getattr(module, "rewards", None) or ():
            for name in getattr(reward, "required_columns", None) or ():
                readers = required.setdefault(name, [])
                reader = getattr(reward, "name", None) or type(reward).__name__
                if reader not in readers:
                    readers.append(reader)
        return required

    def check_prompt_lengths(
        self, count_tokens: Callable[[list[str]], Sequence[int]], limit: int, *, batch: int = 1024
    ) -> None:
        """Check, after :meth:`setup`, that no training or held-out prompt is longer than ``limit`` tokens.

        ``count_tokens`` maps prompts to their lengths in tokens as the policy will see them (chat template
        and special tokens included): the tokenizer is the model's, so the trainer calls this once it has one.
        A prompt that is too long is a one-line :class:`DataError` naming its ``file:line``, raised before
        training instead of when the prompt is drawn.
        """
        self._require_setup()
        self._lengths_checked = True
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset)):
            assert dataset is not None
            progress = _Progress(f"measuring the {split} prompts in tokens", every=1)
            for start in range(0, len(dataset), batch):
                chunk = [item["prompt"] for item in dataset.items[start : start + batch]]
                for offset, length in enumerate(count_tokens(chunk)):
                    if int(length) > limit:
                        i = start + offset
                        raise DataError(
                            f"{self._where[split](i)}: the prompt is {int(length)} tokens long, more than "
                            f"model.max_prompt_length = {limit} (default: context minus rollout.max_new_tokens): "
                            f"{chunk[offset][:40]!r}; shorten it or drop the row"
                        )
                progress(start + len(chunk))

    def _check_lengths_with_module(self) -> None:
        """:meth:`check_prompt_lengths` with the attached module's tokenizer and prompt limit, once, when the
        trainer first asks for a loader (the module has its tokenizer and model config by then; no prompt
        has been sampled yet). Skipped when the module has none, or when the check already ran."""
        if self._lengths_checked:
            return
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        tokenizer, limit_of = getattr(module, "tokenizer", None), getattr(module, "_max_prompt_length", None)
        if tokenizer is None or not callable(limit_of):
            return
        limit = limit_of()
        if limit is None:
            return
        hparams = getattr(module, "hparams", {})
        count = prompt_token_counter(tokenizer, hparams.get("chat_template"), hparams.get("system_prompt"),
                                     cap=int(limit))
        self.check_prompt_lengths(count, int(limit))

    @property
    def columns(self) -> list[str]:
        """Column names a batch carries (``prompt`` first); available after ``setup()``."""
        if self.train_dataset is None:
            raise RuntimeError("PromptDataModule.columns is available after setup()")
        names: dict[str, None] = {}
        for item in self.train_dataset.items[:1000]:
            names.update(dict.fromkeys(item))
        return list(names)

    # -- loaders -------------------------------------------------------------------------------------------

    def _data_parallel_rank(self) -> tuple[int, int]:
        """``(number of data-parallel ranks, this rank)`` from the attached trainer's strategy; (1, 0) alone."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return 1, 0
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", trainer.world_size)), int(kwargs.get("rank", trainer.global_rank))

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        self._check_lengths_with_module()
        assert self.train_dataset is not None
        num_replicas, rank = self._data_parallel_rank()
        sampler = EpochShuffleSampler(
            len(self.train_dataset), seed=self.seed, shuffle=self.shuffle, num_replicas=num_replicas, rank=rank
        )
        if len(sampler) < self.batch_size:
            raise DataError(
                f"{len(self.train_dataset)} training prompts over {num_replicas} data-parallel ranks leave "
                f"{len(sampler)} per rank, fewer than data.batch_size={self.batch_size}; lower data.batch_size"
            )
        return PromptDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Its own generator: creating an iterator (every epoch, and on resume) then draws the workers' base
            # seed from it instead of from the global torch RNG, which the rollout samples with.
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=True,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Held-out prompts in file order; an empty list (no validation) when there are none."""
        self._require_setup()
        self._check_lengths_with_module()
        assert self.val_dataset is not None
        if len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global torch RNG alone
            drop_last=False,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader | list:
        """Same prompts as :meth:`val_dataloader`."""
        return self.val_dataloader()
