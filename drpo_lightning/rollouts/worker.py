"""Rollout sources: where the training loop gets its batches from, in-process or from a rollout worker.

The loop sees one interface (:class:`RolloutSource`): ``submit(t, prompts)`` hands over the prompts of batch
t, ``get(t)`` returns its :class:`RolloutBatch` (``policy_version`` set), ``sync(state_dict, version)`` after
each batch's updates sends the new weights, ``metrics()`` what to log, ``close()``.

- :class:`InProcessRolloutSource` samples in ``get`` with the trainer's own policy (``max_staleness`` 0; a
  sync only moves the version).
- :class:`WorkerRolloutSource` drives a separate worker process (:func:`main`, ``python -m
  drpo_lightning.rollouts.worker`` or ``drpo rollout-worker``) that holds its own copy of the policy, samples
  with the HF engine on its CPU or GPU, and follows the fixed staleness schedule of
  :mod:`drpo_lightning.rollouts.staleness`: with k >= 1 it samples the next batches while the trainer trains.

Control messages and rollouts travel on one TCP connection, authenticated both ways with HMAC over a
shared key, as a JSON header followed by raw tensor bytes (never pickle: a message cannot run code). Weights
travel on a ``torch.distributed`` group of their own (:mod:`drpo_lightning.rollouts.weight_sync`). Every
wait of the trainer has a timeout and fails with one line naming the worker; a worker exits as soon as its
trainer's connection closes or its parent process dies, so a killed trainer leaves no worker behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import queue
import secrets
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from drpo_lightning.errors import ConfigError, UserError
from drpo_lightning.rollouts.staleness import ProducerQueue, StalenessMeter, batch_seed, weights_for_batch
from drpo_lightning.rollouts.weight_sync import WeightReceiver, WeightSender, dtype_from_name, layout_of
from drpo_lightning.types import RolloutBatch

__all__ = ["InProcessRolloutSource", "RolloutSource", "RolloutWorkerError", "WorkerRolloutSource", "main"]

KEY_ENV = "DRPO_ROLLOUT_WORKER_KEY"
"""Environment variable holding the hex key a worker and its trainer authenticate each other with."""


class RolloutWorkerError(UserError):
    """The rollout worker died, timed out or failed; the message is one line naming it."""


# ---------------------------------------------------------------------------------------------- the wire
_LEN = struct.Struct("!Q")
_MAX_FRAME = 1 << 36


class _Channel:
    """Length-prefixed frames on a socket. A message is a JSON header frame, then one frame per tensor it
    lists in ``header["tensors"]`` as ``[name, dtype, shape]``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def _send_frame(self, data: bytes | memoryview) -> None:
        self.sock.sendall(_LEN.pack(len(data)))
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError("connection closed by peer")
            got += k
        return bytes(buf)

    def _recv_frame(self) -> bytes:
        (n,) = _LEN.unpack(self._recv_exact(_LEN.size))
        if n > _MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes announced; the peer does not speak this protocol")
        return self._recv_exact(n)

    def send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
        header = dict(header, tensors=layout_of(tensors))
        with self._send_lock:
            self._send_frame(json.dumps(header).encode())
            for t in tensors.values():
                self._send_frame(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def recv(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        header = json.loads(self._recv_frame())
        tensors = {}
        for name, dtype, shape in header.pop("tensors", []):
            raw = bytearray(self._recv_frame())
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            tensors[name] = flat.view(dtype_from_name(dtype)).reshape(shape)
        return header, tensors

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.sock], [], [], max(0.0, timeout))[0])

    def handshake(self, key: bytes, initiator: bool) -> None:
        """Each side proves it holds ``key`` by an HMAC of the other side's fresh nonce."""
        mine = secrets.token_bytes(32)
        self._send_frame(mine)
        theirs = self._recv_frame()
        role, other = (b"trainer", b"worker") if initiator else (b"worker", b"trainer")
        self._send_frame(hmac.new(key, role + theirs, hashlib.sha256).digest())
        proof = self._recv_frame()
        if not hmac.compare_digest(proof, hmac.new(key, other + mine, hashlib.sha256).digest()):
            raise ConnectionError(f"the peer does not hold the key in {KEY_ENV}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _engine_class(name: str) -> type:
    """The registered rollout engine a worker runs (by name: the wire carries no code or class paths)."""
    from drpo_lightning.registry import ROLLOUTS

    try:
        return ROLLOUTS.get(name)
    except UserError as err:
        raise ConfigError(f"rollout worker engine: {err}") from err


def _batch_tensors(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch._asdict().items() if v is not None}


# -------------------------------------------------------------------------------------------- the sources
class RolloutSource(ABC):
    """Where the loop gets batch t from; the same calls whether it samples in-process or in a worker."""

    max_staleness: int = 0

    def __init__(self) -> None:
        self.meter = StalenessMeter()
        self.synced = 0  # syncs applied: the trainer holds the weights after this many trained batches
        self.versions = [0]  # sync index -> the version number the trainer gave it

    @abstractmethod
    def submit(self, t: int, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int, *,
               topk: int = 0, seed: int | None = None) -> None:
        """Hand over the prompts of batch ``t``. Batch t must be submitted before the trainer sends sync
        ``max(0, t - k) + 1``: prefetch the prompts of batch t + k while training on batch t."""

    @abstractmethod
    def get(self, t: int) -> RolloutBatch:
        """The completions of batch ``t`` (CPU tensors, ``policy_version`` set); waits for them."""

    @abstractmethod
    def sync(self, state_dict: dict[str, torch.Tensor] | None, version: int) -> None:
        """The trainer finished the updates of one batch: its weights are now ``version``."""

    def metrics(self) -> dict[str, float]:
        """Staleness (mean, max, in syncs), seconds waited for rollouts and spent on syncs since last call."""
        return self.meter.summary()

    @abstractmethod
    def close(self) -> None:
        """Release the worker (if any); the source takes no more calls."""

    def __enter__(self) -> RolloutSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessRolloutSource(RolloutSource):
    """Samples in :meth:`get` with the trainer's current policy through ``generate(prompt_ids, prompt_mask,
    num_generations, topk)`` (``RLModule._generate``); synchronous, so ``max_staleness`` must be 0.

    ``seed``: None samples from the ambient torch RNG (the trainer's stream, saved in checkpoints); an int
    samples batch t from a fork of the RNG seeded with ``batch_seed(seed, t)``, as a worker does, so the two
    sources give the same tokens for the same weights.
    """

    def __init__(self, generate: Callable[..., RolloutBatch], *, max_staleness: int = 0,
                 seed: int | None = None, version: int = 0) -> None:
        super().__init__()
        if max_staleness != 0:
            raise ConfigError(
                f"rollout max_staleness = {max_staleness} needs a rollout worker: the in-process engine "
                "samples with the trainer's own, current weights (set max_staleness: 0 or use a worker)"
            )
        self.generate = generate
        self.seed = seed
        self.versions = [int(version)]
        self._requests: dict[int, tuple] = {}

    def submit(self, t, prompt_ids, prompt_mask, num_generations, *, topk=0, seed=None) -> None:
        self._requests[t] = (prompt_ids, prompt_mask, num_generations, topk, seed)

    def get(self, t: int) -> RolloutBatch:
        start = time.perf_counter()
        prompt_ids, prompt_mask, num_generations, topk, seed = self._requests.pop(t)
        if seed is None and self.seed is not None:
            seed = batch_seed(self.seed, t)
        if seed is None:
            batch = self.generate(prompt_ids, prompt_mask, num_generations, topk)
        else:
            devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                batch = self.generate(prompt_ids, prompt_mask, num_generations, topk)
        self.meter.record_batch(self.synced, self.synced, time.perf_counter() - start)
        n = batch.completion_ids.shape[0]
        return batch._replace(policy_version=torch.full((n,), self.versions[-1], dtype=torch.long,
                                                        device=batch.completion_ids.device))

    def sync(self, state_dict, version) -> None:
        self.synced += 1
        self.versions.append(int(version))

    def close(self) -> None:
        self._requests.clear()


class WorkerRolloutSource(RolloutSource):
    """Batches from a rollout worker process sampling with its own copy of the policy.

    Args:
        engine: keyword arguments of the worker's engine (``engine_name``, a registered rollout plugin).
        model_path: local model folder the worker builds the policy's architecture from.
        policy_state_dict: the trainer's current (full, unsharded) weights, sent as sync 0.
        max_staleness: k of the schedule: batch t is sampled with the weights after ``max(0, t - k)`` syncs.
        seed: run seed; batch t samples with ``batch_seed(seed, t)`` whatever the timing.
        eos_token_id / pad_token_id: as for :meth:`RolloutEngine.generate`.
        version: version number of ``policy_state_dict``.
        device: where the worker samples (``cpu``, ``cuda:1``).
        model_kwargs: extra ``from_pretrained`` arguments for the worker's model (e.g. its dtype).
        timeout: seconds any single wait for a batch or a sync may take before :class:`RolloutWorkerError`.
        start_timeout: seconds the worker may take to connect and to load its model (None: ``timeout``).
        spawn: start the worker as a child process (stopped by :meth:`close`); False waits for one started by
            hand with ``drpo rollout-worker --trainer HOST:PORT`` and the same ``DRPO_ROLLOUT_WORKER_KEY``.
        host / port: where this trainer listens for its worker (port 0: any free port, see ``address``).
        backend: weight-sync backend, ``gloo`` (weights staged on the CPU) or ``nccl`` (trainer and worker on
            GPUs; the trainer's side on ``trainer_device``).
        trainer_device: where the trainer stages the weights it sends (a CUDA device for ``nccl``).
        threads: torch CPU threads of the worker (None: torch's default).
        name: what errors call the worker (default ``rollout worker <its rank in the weight-sync group>``).
        log_path: file the spawned worker's output goes to (default: a temporary file).
        weight_sender: with several trainer ranks, rank 0 passes the :class:`WeightSender` it made for all
            of their workers (``num_workers`` = the number of ranks) and broadcasts ``sender.address`` to
            them; its own worker is rank 1 of that group. The source takes ownership (closes it).
        join_group: on trainer rank r > 0: ``(rank 0's sender.address, r + 1, num_ranks + 1)``: this rank's
            worker joins rank 0's group and receives rank 0's broadcasts; :meth:`sync` here only tells the
            worker the layout and version (it needs the state dict or its layout, not a send).
        engine_name: registered name of the engine the worker runs (default ``hf``).
    """

    def __init__(self, engine: dict[str, Any], model_path: str, policy_state_dict: dict[str, torch.Tensor], *,
                 max_staleness: int = 0, seed: int = 0, eos_token_id: int | list[int], pad_token_id: int,
                 version: int = 0, device: str = "cpu", model_kwargs: dict[str, Any] | None = None,
                 timeout: float = 120.0, start_timeout: float | None = None, spawn: bool = True,
                 host: str = "127.0.0.1", port: int = 0, backend: str = "gloo", trainer_device: str = "cpu",
                 threads: int | None = None, name: str | None = None, log_path: str | None = None,
                 weight_sender: WeightSender | None = None,
                 join_group: tuple[str, int, int] | None = None, engine_name: str = "hf") -> None:
        super().__init__()
        if max_staleness < 0:
            raise ConfigError(f"rollout max_staleness must be >= 0, got {max_staleness}")
        on_gpu = torch.device(trainer_device).type == "cuda"
        if backend not in ("gloo", "nccl") or (backend == "nccl") != on_gpu:
            raise ConfigError(f"rollout worker weight sync: backend {backend!r} with the trainer's weights "
                              f"on {trainer_device!r}; use gloo with cpu or nccl with a cuda device")
        try:
            _engine_class(engine_name)(**engine)  # the worker builds the same engine: fail here, before it starts
        except (TypeError, ValueError) as err:
            raise ConfigError(f"rollout worker engine: {err}") from err
        self.max_staleness = int(max_staleness)
        self.seed = int(seed)
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout if start_timeout is not None else timeout)
        if weight_sender is not None and join_group is not None:
            raise ValueError("give weight_sender (trainer rank 0) or join_group (other ranks), not both")
        if join_group is not None:
            group_host, _, group_port = join_group[0].rpartition(":")
            worker_rank, world_size = int(join_group[1]), int(join_group[2])
        else:
            worker_rank = 1
            world_size = weight_sender.world_size if weight_sender is not None else 2
            group_host = weight_sender.host if weight_sender is not None else None  # None: the trainer's host
        self.name = name or f"rollout worker {worker_rank}"
        self.versions = [int(version)]
        self.process: subprocess.Popen | None = None
        self.channel: _Channel | None = None
        self.sender: WeightSender | None = None
        self._results: dict[int, tuple[dict, dict]] = {}
        self._submitted: set[int] = set()
        self._closed = False
        key_hex = os.environ.get(KEY_ENV)
        if not spawn and not key_hex:
            raise ConfigError(f"a rollout worker started by hand needs the same secret in {KEY_ENV} on both "
                              "sides")
        key = bytes.fromhex(key_hex) if key_hex else secrets.token_bytes(32)
        server = socket.create_server((host, port))
        self.address = f"{host}:{server.getsockname()[1]}"
        try:
            if join_group is None:
                self.sender = weight_sender or WeightSender(
                    1, host=host, timeout=self.timeout, backend=backend, device=trainer_device,
                    names=[self.name],
                )
                group_port = self.sender.store.port
            if spawn:
                self._spawn(key, log_path)
            self.channel = self._accept(server, key)
            hello = self._recv("its start", self.start_timeout)
            self.worker_pid = int(hello.get("pid", -1))
            self._send({"op": "init", "model_path": str(model_path), "model_kwargs": model_kwargs or {},
                        "engine": engine, "engine_name": engine_name, "max_staleness": self.max_staleness,
                        "eos_token_id": eos_token_id,
                        "pad_token_id": int(pad_token_id), "device": device, "threads": threads,
                        "name": self.name, "sync": {"host": group_host, "port": int(group_port),
                                                    "rank": worker_rank, "world_size": world_size,
                                                    "backend": backend, "timeout": self.timeout}})
            self._recv("loading the model", self.start_timeout)
            if self.sender is not None:
                self.sender.connect()  # rank 0: waits until every rank's worker has joined
            self._send_weights(policy_state_dict, int(version), 0)
        except BaseException:
            _stop(self.process, self.channel)
            if self.sender is not None:
                self.sender.close()
            raise
        finally:
            server.close()
        self._finalizer = weakref.finalize(self, _stop, self.process, self.channel)

    # -- plumbing ---------------------------------------------------------------------------------
    def _spawn(self, key: bytes, log_path: str | None) -> None:
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="drpo-rollout-worker-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        env = dict(os.environ, **{KEY_ENV: key.hex()})
        cmd = [sys.executable, "-m", "drpo_lightning.rollouts.worker", "--trainer", self.address,
               "--parent-pid", str(os.getpid())]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def _accept(self, server: socket.socket, key: bytes) -> _Channel:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RolloutWorkerError(self._died("starting"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise RolloutWorkerError(
                    f"{self.name} did not connect to {self.address} within {self.start_timeout:g} s"
                    + ("" if self.process else f" (start one: drpo rollout-worker --trainer {self.address})")
                )
            if select.select([server], [], [], min(left, 0.2))[0]:
                sock, _ = server.accept()
                sock.settimeout(self.timeout)
                channel = _Channel(sock)
                try:
                    channel.handshake(key, initiator=True)
                except (OSError, ConnectionError) as err:
                    channel.close()
                    if self.process is not None:
                        raise RolloutWorkerError(f"{self.name}: handshake failed: {err}") from err
                    continue  # a stray connection to a hand-started trainer: keep waiting for the worker
                sock.settimeout(None)
                return channel

    def _who(self) -> str:
        pid = self.process.pid if self.process is not None else getattr(self, "worker_pid", "?")
        return f"{self.name} (pid {pid}, {self.address})"

    def _died(self, doing: str) -> str:
        code = self.process.poll() if self.process is not None else None
        how = f"exited with code {code}" if code is not None else "closed its connection"
        last = ""
        log_path = getattr(self, "log_path", None)
        if log_path and Path(log_path).is_file():
            text = Path(log_path).read_text(errors="replace")
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if lines:
                last = f"; its last output: {lines[-1][:200]}"
        return f"{self._who()} {how} while {doing}{last}"

    def _recv(self, doing: str, timeout: float) -> dict[str, Any]:
        """The next message from the worker; its error message or death is raised as one line."""
        header, tensors = self._recv_raw(doing, timeout)
        if header.get("op") == "error":
            raise RolloutWorkerError(f"{self._who()}: {header.get('message', 'failed')}")
        header["_tensors"] = tensors
        return header

    def _recv_raw(self, doing: str, timeout: float) -> tuple[dict, dict]:
        assert self.channel is not None
        deadline = time.monotonic() + timeout
        while not self.channel.readable(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self.process is not None and self.process.poll() is not None:
                raise RolloutWorkerError(self._died(doing))
            if time.monotonic() >= deadline:
                raise RolloutWorkerError(f"{self._who()} sent nothing for {timeout:g} s while {doing}")
        try:
            self.channel.sock.settimeout(self.timeout)
            return self.channel.recv()
        except (OSError, ConnectionError, ValueError) as err:
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(1.0)
            raise RolloutWorkerError(self._died(doing)) from err
        finally:
            self.channel.sock.settimeout(None)

    def _send(self, header: dict, tensors: dict | None = None, doing: str = "") -> None:
        assert self.channel is not None
        try:
            self.channel.sock.settimeout(self.timeout)
            self.channel.send(header, tensors)
        except OSError as err:
            raise RolloutWorkerError(self._died(doing or f"sending {header.get('op')}")) from err
        finally:
            self.channel.sock.settimeout(None)

    def _send_weights(self, state_dict: dict[str, torch.Tensor], version: int, index: int) -> None:
        self._send({"op": "sync", "index": index, "version": version, "layout": layout_of(state_dict)},
                   doing=f"announcing weights v{version}")
        if self.sender is None:
            return  # another trainer rank (rank 0) broadcasts them
        try:
            seconds = self.sender.send(state_dict, version)
        except UserError as err:
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(1.0)  # a peer that reset the connection is usually exiting: say so
                if self.process.poll() is not None:
                    raise RolloutWorkerError(self._died(f"receiving weights v{version}")) from err
            raise
        self.meter.record_sync(seconds)

    # -- the interface ------------------------------------------------------------------------------
    def submit(self, t, prompt_ids, prompt_mask, num_generations, *, topk=0, seed=None) -> None:
        need = weights_for_batch(t, self.max_staleness)
        if self.synced > need:
            raise RuntimeError(
                f"batch {t} submitted after sync {self.synced}: with max_staleness={self.max_staleness} it "
                f"must be sampled with sync {need}, so submit it before the trainer syncs the weights after "
                f"batch {need}"
            )
        self._submitted.add(t)
        self._send({"op": "generate", "t": int(t), "num_generations": int(num_generations), "topk": int(topk),
                    "seed": batch_seed(self.seed, t) if seed is None else int(seed)},
                   {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, doing=f"sending batch {t}")

    def get(self, t: int) -> RolloutBatch:
        if t not in self._submitted:
            raise RuntimeError(f"batch {t} was never submitted")
        need = weights_for_batch(t, self.max_staleness)
        if need > self.synced:
            raise RuntimeError(
                f"batch {t} is sampled with the weights after sync {need} (max_staleness="
                f"{self.max_staleness}) but the trainer has sent {self.synced}: it would wait forever"
            )
        start = time.perf_counter()
        while t not in self._results:
            message = self._recv(f"the trainer waited for batch {t}", self.timeout)
            if message.get("op") == "batch":
                self._results[int(message["t"])] = (message, message.pop("_tensors"))
        self._submitted.discard(t)
        header, tensors = self._results.pop(t)
        sampled_with = int(header["sync"])
        if sampled_with != need:
            raise RuntimeError(f"batch {t} came back sampled with sync {sampled_with}; the schedule says "
                               f"{need}")
        self.meter.record_batch(sampled_with, self.synced, time.perf_counter() - start)
        return RolloutBatch(**tensors)

    @property
    def sync_address(self) -> str | None:
        """Address of the weight-sync group this source hosts (None on ranks that join one)."""
        return self.sender.address if self.sender is not None else None

    def sync(self, state_dict: dict[str, torch.Tensor] | None, version: int) -> None:
        if state_dict is None:
            raise ValueError("a rollout worker needs the trainer's full state dict (or, on ranks > 0, a dict "
                             "with its names, dtypes and shapes) at every sync")
        self.synced += 1
        self.versions.append(int(version))
        self._send_weights(state_dict, int(version), self.synced)

    def fetch_weights(self) -> dict[str, torch.Tensor]:
        """The weights the worker samples with now (for tests and debugging: the whole model travels)."""
        self._send({"op": "fetch_weights"})
        while True:
            message = self._recv("sending its weights", self.timeout)
            if message.get("op") == "weights":
                return message["_tensors"]
            if message.get("op") == "batch":
                self._results[int(message["t"])] = (message, message.pop("_tensors"))

    def close(self) -> None:
        """Ask the worker to exit and wait for it (kill it after ``timeout`` at most 10 s)."""
        if self._closed:
            return
        self._closed = True
        if self.channel is not None:
            with contextlib.suppress(OSError):
                self.channel.sock.settimeout(5.0)
                self.channel.send({"op": "close"})
        if self.process is not None:
            try:
                self.process.wait(min(self.timeout, 10.0))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.sender is not None:
            self.sender.close()
        self._finalizer()


def _stop(process: subprocess.Popen | None, channel: _Channel | None) -> None:
    """Last resort when a source is dropped without close(): the worker must not outlive it."""
    if channel is not None:
        with contextlib.suppress(OSError):
            channel.close()
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------- the worker
class _Worker:
    """The worker's state: its model, engine and weight receiver; :meth:`run` is its main loop.

    A reader thread takes every message off the connection as it arrives (so the trainer's weight broadcast
    never waits for a generation to finish) and stages received weights; the main thread samples the
    requested batches in order, applying staged weights only when the schedule calls for them.
    """

    def __init__(self, channel: _Channel, init: dict[str, Any], trainer_host: str) -> None:
        from drpo_lightning.models import disable_dropout, load_causal_lm

        self.channel = channel
        self.name = init.get("name") or "rollout worker"
        if init.get("threads"):
            torch.set_num_threads(int(init["threads"]))
        self.device = torch.device(init.get("device") or "cpu")
        self.k = int(init["max_staleness"])
        self.eos_token_id = init["eos_token_id"]
        self.pad_token_id = int(init["pad_token_id"])
        self.engine = _engine_class(init.get("engine_name") or "hf")(**init["engine"])
        self.model = load_causal_lm(init["model_path"], model_kwargs=init.get("model_kwargs")).to(self.device)
        disable_dropout(self.model)
        self.model.eval()
        sync = init["sync"]
        # By default the store listens next to the trainer's control port, at the host this worker dialled.
        self.receiver = WeightReceiver(
            f"{sync.get('host') or trainer_host}:{int(sync['port'])}",
            int(sync["rank"]),
            int(sync["world_size"]),
            timeout=float(sync["timeout"]), backend=sync["backend"],
            device="cpu" if sync["backend"] == "gloo" else self.device, name=self.name,
        )
        self.synced = -1  # no weights from the trainer yet: the folder's weights are never sampled with
        self.version = 0
        self.inbox: queue.Queue = queue.Queue()

    def _read(self) -> None:
        """Reader thread: every message in order; weights are received right away and staged."""
        try:
            while True:
                header, tensors = self.channel.recv()
                op = header.get("op")
                if op == "sync":
                    layout = [tuple(x) for x in header["layout"]]
                    state = self.receiver.receive(layout, int(header["version"]))
                    self.inbox.put(("weights", header, state))
                elif op in ("generate", "fetch_weights", "close"):
                    self.inbox.put((op, header, tensors))
                    if op == "close":
                        return
                else:
                    raise RuntimeError(f"unknown message {op!r}")
        except (ConnectionError, OSError):
            _exit(f"{self.name}: the trainer closed the connection; exiting", 0)
        except Exception as err:  # a failed sync: the trainer gets the same line from its side
            _exit(f"{self.name}: {_one_line(err)}", 1)

    def _apply(self, header: dict, state: dict[str, torch.Tensor]) -> None:
        self.engine.pause()  # between generations already; an engine with its own server must stop it here
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            message = f"the trainer's weights do not fit this worker's model: {_one_line(err)}"
            raise RuntimeError(message) from err
        self.engine.resume()
        self.version = int(header["version"])
        self.engine.load_weights(None, self.version)  # the weights live in self.model; the engine tracks v

    def _generate(self, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        t = int(header["t"])
        start = time.perf_counter()
        torch.manual_seed(int(header["seed"]))
        batch = self.engine.generate(
            self.model, tensors["prompt_ids"].to(self.device), tensors["prompt_mask"].to(self.device),
            num_generations=int(header["num_generations"]), eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, topk=int(header["topk"]),
        )
        n = batch.completion_ids.shape[0]
        batch = batch._replace(policy_version=torch.full((n,), self.version, dtype=torch.long))
        self.channel.send({"op": "batch", "t": t, "sync": self.synced, "version": self.version,
                           "seconds": time.perf_counter() - start}, _batch_tensors(batch))

    def run(self) -> None:
        self.receiver.connect()
        threading.Thread(target=self._read, name="drpo-rollout-reader", daemon=True).start()
        schedule = ProducerQueue(self.k)
        while True:
            op, header, payload = self.inbox.get()
            if op == "close":
                return
            if op == "generate":
                schedule.add_request(int(header["t"]), (header, payload))
            elif op == "weights":
                schedule.add_weights(int(header["index"]), (header, payload))
            while (action := schedule.next()) is not None:
                kind, _, item = action
                if kind == "apply":
                    self._apply(*item)
                    self.synced = schedule.synced
                else:
                    self._generate(*item)
            if op == "fetch_weights":
                self.channel.send({"op": "weights"}, self.model.state_dict())


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _exit(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def _watch_parent(pid: int) -> None:
    """Exit when the process that started this worker is gone (it was killed: no close message came)."""
    while True:
        if os.getppid() != pid:
            _exit(f"rollout worker: the trainer (pid {pid}) is gone; exiting", 1)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """``drpo rollout-worker --trainer HOST:PORT``: connect to a trainer, sample for it until it closes."""
    parser = argparse.ArgumentParser(prog="drpo rollout-worker", description=main.__doc__)
    parser.add_argument("--trainer", required=True, help="HOST:PORT the trainer listens on for its worker")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to reach the trainer")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    key_hex = os.environ.get(KEY_ENV)
    if not key_hex:
        print(f"drpo: error: {KEY_ENV}: not set; give the worker the trainer's key", file=sys.stderr)
        return 2
    host, _, port = args.trainer.rpartition(":")
    deadline = time.monotonic() + args.connect_timeout
    try:
        while True:  # the trainer may not listen yet: a worker can be started first
            try:
                sock = socket.create_connection((host, int(port)), timeout=args.connect_timeout)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        channel = _Channel(sock)
        channel.handshake(bytes.fromhex(key_hex), initiator=False)
        sock.settimeout(None)
    except (OSError, ConnectionError, ValueError) as err:
        print(f"drpo: error: --trainer {args.trainer}: {_one_line(err)}", file=sys.stderr)
        return 2
    channel.send({"op": "hello", "pid": os.getpid(), "host": socket.gethostname()})
    init, _ = channel.recv()
    name = init.get("name") or "rollout worker"
    try:
        worker = _Worker(channel, init, host)
        channel.send({"op": "ready"})
        worker.run()
    except Exception as err:
        with contextlib.suppress(OSError):
            channel.send({"op": "error", "message": _one_line(err)})
        print(f"{name}: {_one_line(err)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (seconds with torch + transformers loaded): nothing to save
