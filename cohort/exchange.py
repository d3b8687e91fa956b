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


# Ray sends task arguments up to 100 KiB inside the call itself (max_direct_call_object_size);
# larger ones it puts in the object store, once per call.
INLINE_BYTES = 96 * 1024


class StoreExchange:
    """Each student sends its logits straight to every peer, actor to actor.

    Peers call each other directly, so no driver is on the per-step path; only the
    4-byte-per-logit tensors travel, never images. Logits up to `inline_bytes` (128 x 100
    float32 is 51 kB) ride inside the `deliver` call: no object-store round trip, no
    borrowed reference to track. Larger ones are `ray.put` once and every peer gets the
    reference, which it fetches from the store in `gather`.
    """

    def __init__(self, rank: int, peers: Sequence, mailbox: Mailbox, device: torch.device,
                 timeout: float = 600.0, inline_bytes: int = INLINE_BYTES):
        self.rank, self.peers, self.mailbox, self.device = rank, list(peers), mailbox, device
        self.timeout, self.inline_bytes = timeout, inline_bytes
        self._own: dict[tuple, torch.Tensor] = {}

    def publish(self, key: tuple, logits: torch.Tensor) -> None:
        value = logits.detach().cpu()
        if value.numel() * value.element_size() > self.inline_bytes:
            value = ray.put(value)
        for j, peer in enumerate(self.peers):
            if j != self.rank:
                # A list keeps a reference unresolved: the peer fetches it in gather.
                peer.deliver.remote(key, self.rank, [value])
        self._own[key] = logits.detach()

    def gather(self, key: tuple) -> list[torch.Tensor]:
        values = self.mailbox.take(key, len(self.peers) - 1, self.timeout)
        refs = sorted(j for j, v in values.items() if isinstance(v, ray.ObjectRef))
        if refs:
            values.update(zip(refs, ray.get([values[j] for j in refs])))
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
