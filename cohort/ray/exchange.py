"""Logit transports between the students of a Ray cohort.

Every transport has the same two calls, made once per step by every student:
`publish(key, logits)` right after its forward pass, and `gather(key)`, which returns all
members' logits for that step in member order (its own included). Work that needs no peer
(the cross-entropy part of the loss) runs between the two, while the peers' logits travel.
Every payload carries its step key (epoch, step): a peer's logits from another step raise
StepMismatch, naming both keys, and are never trained on.

`store` (the default) goes through the Ray object store: each student owns one mutable
shared-memory object (a ray.experimental.channel) that it rewrites every step and its peers
read, so no actor call and no new object is made per step. An earlier design pushed each
step's logits to every peer with an actor call (now `refs`, below); benchmarks/exchange.py
measured it at about 5x the latency of a bare gloo all_gather, against 0.55x for the
channels (K = 2, README's Performance section). The channel API is alpha
(Ray's Compiled Graphs are winding down), so it is checked before a run starts
(channel_api_problem) and `store` falls back to `refs` when it is missing or has changed.
`refs` uses public APIs only: each step's logits go to the peers in an actor call, inside it
when small, else as the ObjectRef of one `ray.put` object that every peer reads.
`collective` is an all_gather over torch.distributed (gloo on CPU, nccl on GPU).

A transport that fails (a channel error or timeout, a lost object, a collective error) raises
ExchangeFailed: the driver counts it as a member failure and restarts the cohort.
"""
from __future__ import annotations

import datetime
import inspect
import threading
from contextlib import contextmanager
from typing import Sequence

import ray
import torch
import torch.distributed as dist

from ..errors import RunFailed
from ..progress import say

# Ray passes a task argument up to this size inside the call (max_direct_call_object_size)
# and puts a bigger one in the object store once per call; `refs` puts it there once per step.
INLINE_BYTES = 100 * 1024
KEY_BYTES = 16   # (epoch, step) as two int64, appended to the collective's payload


class ExchangeFailed(RuntimeError):
    """The transport failed mid-step: a member failure, after which the cohort restarts
    from its last checkpoint (bounded by --max-restarts)."""


class StepMismatch(RunFailed):
    """A peer's logits belong to another step. A bug that a restart would repeat: the run
    stops (one line, exit code 1) rather than train on them."""


def check_key(rank: int, peer: int, expected: tuple, got) -> None:
    if tuple(got) != tuple(expected):
        raise StepMismatch(f"student{rank} expected the logits of (epoch, step) {tuple(expected)} "
                           f"but student{peer} sent {tuple(got)}; nothing was trained on them")


@contextmanager
def transport_errors(action: str, key: tuple):
    """Re-raise what the transport underneath raises as ExchangeFailed (one line, picklable)."""
    try:
        yield
    except StepMismatch:
        raise
    # RayError covers the channel's errors and timeouts, lost objects and dead owners;
    # RuntimeError covers torch.distributed's (DistError and gloo's plain RuntimeErrors)
    except (ray.exceptions.RayError, RuntimeError, TimeoutError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ExchangeFailed(f"{action} of step {tuple(key)}: {type(exc).__name__}"
                             + (f": {detail}" if detail else "")) from exc


# ---- is the channel API the one `store` was written against? ---------------------------------
CHANNEL_CALLS = {"__init__": ("writer", "reader_and_node_list", "typ"), "write": ("value", "timeout"),
                 "read": ("timeout",), "close": ()}


def channel_api_problem() -> str | None:
    """Why `store` cannot run on this Ray (one phrase), or None when it can: the channel class
    must import and take the arguments StoreExchange passes, in the same order."""
    try:
        from ray.experimental.channel.shared_memory_channel import Channel
    except Exception as exc:   # gone, moved, or refusing to import: all mean "not usable"
        return f"ray {ray.__version__} has no usable ray.experimental.channel ({exc})"
    for name, wanted in CHANNEL_CALLS.items():
        call = getattr(Channel, name, None)
        if not callable(call):
            return f"ray {ray.__version__}'s channel has no {name}()"
        try:
            params = tuple(inspect.signature(call).parameters)[1:1 + len(wanted)]
        except (TypeError, ValueError):
            return f"ray {ray.__version__}'s channel {name}() has no readable signature"
        if params != wanted:
            return (f"ray {ray.__version__}'s channel {name}() takes {params}, "
                    f"not {wanted}")
    return None


def resolve_exchange(requested: str) -> str:
    """The transport a run uses: `store` becomes `refs`, with one line saying why, when this
    Ray's channel API is missing or changed."""
    if requested != "store":
        return requested
    problem = channel_api_problem()
    if problem is None:
        return requested
    say(f"--exchange store: {problem}; using --exchange refs (public Ray APIs only)")
    return "refs"


# ---- the wire format ----------------------------------------------------------------------------
def _to_wire(tensor: torch.Tensor):
    """A numpy view of a CPU tensor (no copy); dtypes numpy lacks (bfloat16) stay tensors.

    Ray serialises numpy arrays with pickle protocol 5 buffers, while a CPU torch tensor goes
    through torch's own reducer (a torch.save into bytes): 45 us against 404 us for a
    128 x 100 float32 payload, measured here."""
    try:
        return tensor.numpy()
    except TypeError:
        return tensor


def _from_wire(value) -> torch.Tensor:
    """An owned copy: the value may view a shared buffer, which the next write reuses."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return torch.from_numpy(value.copy())


def _nbytes(value) -> int:
    return value.nbytes if hasattr(value, "nbytes") else value.numel() * value.element_size()


# ---- the transports -----------------------------------------------------------------------------
class StoreExchange:
    """Each student writes its logits into one object-store channel that its K-1 peers read.

    A channel (ray.experimental.channel) is a mutable object in the Ray object store: written
    in place every step, no actor call, no new object per step. Peers on the writer's node
    read the same buffer; Ray pushes each write to one buffer per other node. One slot: a
    write waits until every reader has taken the previous value, so the members move in
    lockstep, as a cohort does; each value is (key, logits), checked on reading.
    """

    def __init__(self, rank: int, mine, channels: Sequence, device: torch.device,
                 timeout: float = 600.0):
        self.rank, self.mine, self.channels = rank, mine, list(channels)
        self.world = len(self.channels)
        self.device, self.timeout = device, timeout
        self._own: torch.Tensor | None = None

    @staticmethod
    def open(rank: int, peers: Sequence, nodes: Sequence[str], buffer_bytes: int):
        """The calling actor's own channel, read by every other member (call it in the actor)."""
        from ray.experimental.channel.shared_memory_channel import Channel
        readers = [(peer, node) for j, (peer, node) in enumerate(zip(peers, nodes)) if j != rank]
        writer = ray.get_runtime_context().current_actor
        return Channel(writer, readers, max(buffer_bytes, 1 << 16))  # grows itself if needed

    def publish(self, key: tuple, logits: torch.Tensor) -> None:
        self._own = logits.detach()
        with transport_errors("writing the logits", key):
            self.mine.write((tuple(key), _to_wire(self._own.cpu())), timeout=self.timeout)

    def gather(self, key: tuple) -> list[torch.Tensor]:
        out = []
        for j, channel in enumerate(self.channels):
            if j == self.rank:
                out.append(self._own)
                continue
            with transport_errors(f"reading student{j}'s logits", key):
                their_key, value = channel.read(timeout=self.timeout)
            check_key(self.rank, j, key, their_key)
            out.append(_from_wire(value).to(self.device, non_blocking=True))
        self._own = None
        return out

    def close(self) -> None:
        self.mine.close()


class RefsExchange:
    """Public Ray APIs only: each step, every student sends its logits to each peer in an
    actor call (`deliver`, run in the peer's second thread) - inside the call when they are
    under INLINE_BYTES, else as the ObjectRef of one `ray.put` object that all K-1 peers read
    from the object store. The ref travels inside a list, so Ray passes it on unresolved.

    A threaded actor may run two calls from one caller out of order, so each delivery carries
    the sender's publish count (which delivery it is) besides its step key (what it holds).
    """

    def __init__(self, rank: int, peers: Sequence, device: torch.device, timeout: float = 600.0,
                 inline_bytes: int = INLINE_BYTES):
        self.rank, self.peers, self.world = rank, list(peers), len(peers)
        self.device, self.timeout, self.inline_bytes = device, timeout, inline_bytes
        self._inbox: dict[tuple[int, int], tuple] = {}     # (sender, count) -> (key, payload)
        self._arrived = threading.Condition()
        self._published = self._gathered = 0
        self._own: torch.Tensor | None = None

    def deliver(self, sender: int, count: int, key: tuple, payload) -> None:
        with self._arrived:
            self._inbox[(sender, count)] = (tuple(key), payload)
            self._arrived.notify_all()

    def publish(self, key: tuple, logits: torch.Tensor) -> None:
        self._own = logits.detach()
        value = _to_wire(self._own.cpu())
        with transport_errors("sending the logits", key):
            payload = value if _nbytes(value) < self.inline_bytes else [ray.put(value)]
            for j, peer in enumerate(self.peers):
                if j != self.rank:
                    peer.deliver_logits.remote(self.rank, self._published, tuple(key), payload)
        self._published += 1

    def _received(self, key: tuple) -> dict[int, tuple]:
        """{peer: (key, payload)} of this gather, waiting up to the timeout."""
        count, self._gathered = self._gathered, self._gathered + 1
        wanted = [(j, count) for j in range(self.world) if j != self.rank]
        with self._arrived:
            if not self._arrived.wait_for(lambda: all(w in self._inbox for w in wanted),
                                          timeout=self.timeout):
                late = [f"student{j}" for j, c in wanted if (j, c) not in self._inbox]
                raise TimeoutError(f"no logits from {', '.join(late)} within {self.timeout:g}s")
            return {j: self._inbox.pop((j, c)) for j, c in wanted}

    def gather(self, key: tuple) -> list[torch.Tensor]:
        with transport_errors("receiving the peers' logits", key):
            got = self._received(key)
            for j, (their_key, _) in got.items():
                check_key(self.rank, j, key, their_key)
            boxed = {j: p[0] for j, (_, p) in got.items() if isinstance(p, list)}
            fetched = dict(zip(boxed, ray.get(list(boxed.values()), timeout=self.timeout)))
        out = []
        for j in range(self.world):
            if j == self.rank:
                out.append(self._own)
                continue
            value = fetched[j] if j in fetched else got[j][1]
            out.append(_from_wire(value).to(self.device, non_blocking=True))
        self._own = None
        return out

    def close(self) -> None:
        with self._arrived:
            self._inbox.clear()


class CollectiveExchange:
    """An all_gather over torch.distributed: gloo on CPU, nccl on GPU. The logits' bytes and
    the step key (two int64) travel as one uint8 tensor: one collective per step."""

    def __init__(self, rank: int, world: int, master: tuple[str, int], device: torch.device,
                 timeout: float = 600.0):
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self._pending: dict[tuple, tuple] = {}

    def publish(self, key: tuple, logits: torch.Tensor) -> None:
        mine = logits.detach().contiguous()
        stamp = torch.tensor(tuple(key), dtype=torch.int64).to(mine.device, non_blocking=True)
        wire = torch.cat([mine.view(-1).view(torch.uint8), stamp.view(torch.uint8)])
        out = [torch.empty_like(wire) for _ in range(self.world)]
        with transport_errors("all_gather of the logits", key):
            work = dist.all_gather(out, wire, async_op=True)
        self._pending[key] = (out, work, mine)

    def gather(self, key: tuple) -> list[torch.Tensor]:
        out, work, mine = self._pending.pop(key)
        with transport_errors("all_gather of the logits", key):
            work.wait(datetime.timedelta(seconds=self.timeout))
        keys = torch.stack([w[-KEY_BYTES:].view(torch.int64) for w in out]).tolist()
        for j, their_key in enumerate(keys):
            check_key(self.rank, j, key, their_key)
        return [w[:-KEY_BYTES].view(mine.dtype).view(mine.shape) for w in out]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
