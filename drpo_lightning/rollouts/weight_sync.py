"""Weight sync from trainer rank 0 to rollout workers over a ``torch.distributed`` group of their own.

The group is built directly from a ``TCPStore`` (hosted by rank 0) and a ``ProcessGroupGloo`` (CPU) or
``ProcessGroupNCCL`` (GPU) object: it never touches the default process group that Lightning's strategy
uses, so a sync can neither deadlock with nor be confused for a collective of the training ranks. Rank 0 is
the trainer, ranks 1 .. n the workers.

A sync broadcasts the full state dict as raw bytes (each tensor's storage viewed as ``uint8``), packed into
buckets of at most ``bucket_bytes`` so memory stays bounded and dtypes need no backend support: what arrives
is bitwise what was sent. The layout (names, dtypes, shapes) and the version travel on the control
connection first; a header broadcast carries the version and byte count again, so a worker that lost track
fails loudly instead of loading shifted bytes. Every wait has a timeout and its error names the worker.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from drpo_lightning.errors import UserError

__all__ = ["WeightReceiver", "WeightSender", "WeightSyncError", "layout_of"]

_MAGIC = 0x5EED5
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
}

Layout = list[tuple[str, str, list[int]]]
"""(name, dtype name, shape) of each tensor, in send order."""


class WeightSyncError(UserError):
    """A weight sync that failed or timed out (a worker died, a network fault): one line naming the worker."""


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r} (supported: {', '.join(_DTYPES)})")
    return _DTYPES[name]


def layout_of(state_dict: dict[str, torch.Tensor]) -> Layout:
    return [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in state_dict.items()]


def _nbytes(dtype: str, shape: list[int]) -> int:
    numel = 1
    for n in shape:
        numel *= int(n)
    return numel * dtype_from_name(dtype).itemsize


def _buckets(layout: Layout, bucket_bytes: int) -> Iterator[list[int]]:
    """Indices of consecutive tensors whose bytes fit one bucket (a bigger tensor gets a bucket alone)."""
    bucket: list[int] = []
    size = 0
    for i, (_, dtype, shape) in enumerate(layout):
        n = _nbytes(dtype, shape)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(i)
        size += n
    if bucket:
        yield bucket


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _make_group(store: dist.Store, rank: int, size: int, timeout: float, backend: str) -> dist.ProcessGroup:
    store = dist.PrefixStore("drpo-weight-sync/", store)
    td = datetime.timedelta(seconds=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, td)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise ValueError("weight sync backend 'nccl': this torch build has no NCCL (use gloo)")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = td
        return dist.ProcessGroupNCCL(store, rank, size, options)
    raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {backend!r}")


class _Endpoint:
    def __init__(self, rank: int, world_size: int, timeout: float, backend: str, device: torch.device | str):
        self.rank = rank
        self.world_size = world_size
        self.timeout = float(timeout)
        self.backend = backend
        self.device = torch.device(device)
        self.group: dist.ProcessGroup | None = None

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        assert self.group is not None, "connect() first"
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.timeout = datetime.timedelta(seconds=self.timeout)
        try:
            work = self.group.broadcast([tensor], options)
            if not work.wait(datetime.timedelta(seconds=self.timeout)):
                raise TimeoutError(f"no reply within {self.timeout:g} s")
        except Exception as err:
            raise WeightSyncError(f"{self._who()}: {what} failed: {_first_line(err)}") from err

    def _who(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            with contextlib.suppress(Exception):  # a peer that died already; nothing left to release
                group.shutdown()


class WeightSender(_Endpoint):
    """Rank 0 of the weight-sync group: hosts its rendezvous and broadcasts state dicts to the workers.

    Args:
        num_workers: workers that will join (ranks 1 .. num_workers).
        host: address the workers reach this process at (the store listens on it).
        port: store port; 0 picks a free one (see :attr:`address`).
        timeout: seconds any wait (join, broadcast) may take before :class:`WeightSyncError`.
        backend: ``gloo`` (tensors staged on the CPU) or ``nccl`` (tensors on ``device``).
        names: what to call the workers in errors (default ``rollout worker 1`` ...).
    """

    def __init__(self, num_workers: int, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0,
                 backend: str = "gloo", device: torch.device | str = "cpu", names: list[str] | None = None,
                 bucket_bytes: int = 256 * 2**20) -> None:
        super().__init__(0, num_workers + 1, timeout, backend, device)
        self.names = names or [f"rollout worker {i}" for i in range(1, num_workers + 1)]
        self.bucket_bytes = int(bucket_bytes)
        self.host = host
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.timeout))
        self.address = f"{host}:{self.store.port}"

    def _who(self) -> str:
        return ", ".join(self.names)

    def connect(self) -> None:
        """Wait (at most ``timeout``) until every worker has joined the group."""
        try:
            self.group = _make_group(self.store, 0, self.world_size, self.timeout, self.backend)
        except Exception as err:
            raise WeightSyncError(
                f"{self._who()}: did not join the weight-sync group at {self.address} within "
                f"{self.timeout:g} s ({_first_line(err)})"
            ) from err

    def send(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Broadcast ``state_dict`` as ``version``; every worker must call :meth:`WeightReceiver.receive` with
        the same layout. Returns the seconds it took."""
        start = time.perf_counter()
        layout = layout_of(state_dict)
        tensors = list(state_dict.values())
        total = sum(_nbytes(d, s) for _, d, s in layout)
        header = torch.tensor([_MAGIC, int(version), total, len(layout)], dtype=torch.int64,
                              device=self.device)
        self._broadcast(header, f"sending the header of weights v{version}")
        for bucket in _buckets(layout, self.bucket_bytes):
            parts = [tensors[i].detach().contiguous().reshape(-1).view(torch.uint8) for i in bucket]
            flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.device)
            self._broadcast(flat, f"sending weights v{version}")
        return time.perf_counter() - start


class WeightReceiver(_Endpoint):
    """A worker's end of the weight-sync group (rank ``rank`` >= 1)."""

    def __init__(self, address: str, rank: int, world_size: int, *, timeout: float = 120.0,
                 backend: str = "gloo", device: torch.device | str = "cpu", name: str | None = None,
                 bucket_bytes: int = 256 * 2**20) -> None:
        super().__init__(rank, world_size, timeout, backend, device)
        self.name = name or f"rollout worker {rank}"
        self.address = address
        self.bucket_bytes = int(bucket_bytes)

    def _who(self) -> str:
        return self.name

    def connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        try:
            store = dist.TCPStore(host, int(port), is_master=False,
                                  timeout=datetime.timedelta(seconds=self.timeout))
            self.group = _make_group(store, self.rank, self.world_size, self.timeout, self.backend)
        except Exception as err:
            raise WeightSyncError(
                f"{self.name}: could not join the weight-sync group at {self.address}: {_first_line(err)}"
            ) from err

    def receive(self, layout: Layout, version: int) -> dict[str, torch.Tensor]:
        """The state dict of ``version`` laid out as ``layout``, bitwise as rank 0 sent it (on ``device``)."""
        total = sum(_nbytes(d, s) for _, d, s in layout)
        header = torch.zeros(4, dtype=torch.int64, device=self.device)
        self._broadcast(header, f"receiving the header of weights v{version}")
        expected = [_MAGIC, int(version), total, len(layout)]
        if header.tolist() != expected:
            raise WeightSyncError(
                f"{self.name}: weights header {header.tolist()} does not match the announced "
                f"[magic, version, bytes, tensors] = {expected}"
            )
        out: dict[str, torch.Tensor] = {}
        for bucket in _buckets(layout, self.bucket_bytes):
            sizes = [_nbytes(layout[i][1], layout[i][2]) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
            self._broadcast(flat, f"receiving weights v{version}")
            for i, part in zip(bucket, flat.split(sizes)):
                name, dtype, shape = layout[i]
                # clone: a fresh storage, aligned for the wider dtype whatever the byte offset in the bucket
                out[name] = part.clone().view(dtype_from_name(dtype)).reshape(shape)
        return out
