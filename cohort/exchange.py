"""Logit transports between the students of a Ray cohort.

Both transports have the same two calls, made once per step by every student:
`publish(key, logits)` right after its forward pass, and `gather(key)`, which returns all
members' logits for that step in member order (its own included). Work that needs no peer
(the cross-entropy part of the loss) runs between the two, while the peers' logits travel.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import ray
import torch
import torch.distributed as dist


class PeerTimeout(RuntimeError):
    pass


class Mailbox:
    """Per-step inbox of an actor, filled by its peers' `deliver` calls (other threads)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._items: dict[tuple, dict[int, object]] = {}

    def put(self, key: tuple, sender: int, value) -> None:
        with self._cond:
            self._items.setdefault(key, {})[sender] = value
            self._cond.notify_all()

    def take(self, key: tuple, count: int, timeout: float) -> dict[int, object]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._items.get(key, ())) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout(f"peers' logits for step {key} did not arrive in {timeout:.0f}s")
                self._cond.wait(left)
            return self._items.pop(key)


class StoreExchange:
    """Each student `ray.put`s its logits once and sends the reference to every peer.

    Peers call each other directly (actor to actor), so no driver is on the per-step path;
    only the 4-byte-per-logit tensors travel, never images.
    """

    def __init__(self, rank: int, peers: Sequence, mailbox: Mailbox, device: torch.device,
                 timeout: float = 600.0):
        self.rank, self.peers, self.mailbox, self.device = rank, list(peers), mailbox, device
        self.timeout = timeout
        self._own: dict[tuple, torch.Tensor] = {}

    def publish(self, key: tuple, logits: torch.Tensor) -> None:
        ref = ray.put(logits.detach().cpu())
        for j, peer in enumerate(self.peers):
            if j != self.rank:
                # A list keeps the reference unresolved: the peer fetches it from the store.
                peer.deliver.remote(key, self.rank, [ref])
        self._own[key] = logits.detach()

    def gather(self, key: tuple) -> list[torch.Tensor]:
        refs = self.mailbox.take(key, len(self.peers) - 1, self.timeout)
        values = dict(zip(sorted(refs), ray.get([refs[j] for j in sorted(refs)])))
        values[self.rank] = self._own.pop(key)
        return [values[j].to(self.device, non_blocking=True) for j in range(len(self.peers))]

    def close(self) -> None:
        self._own.clear()


class CollectiveExchange:
    """An all_gather over torch.distributed: gloo on CPU, nccl on GPU."""

    def __init__(self, rank: int, world: int, master: tuple[str, int], device: torch.device,
                 timeout: float = 600.0):
        import datetime
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        self.world, self.device = world, device
        self._pending: dict[tuple, tuple] = {}

    def publish(self, key: tuple, logits: torch.Tensor) -> None:
        mine = logits.detach().contiguous()
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self._pending[key] = (out, dist.all_gather(out, mine, async_op=True))

    def gather(self, key: tuple) -> list[torch.Tensor]:
        out, work = self._pending.pop(key)
        work.wait()
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
