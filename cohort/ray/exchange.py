"""Logit transports between the students of a Ray cohort.

Both transports have the same two calls, made once per step by every student:
`publish(key, logits)` right after its forward pass, and `gather(key)`, which returns all
members' logits for that step in member order (its own included). Work that needs no peer
(the cross-entropy part of the loss) runs between the two, while the peers' logits travel.

`store` (the default) goes through the Ray object store: each student owns one mutable
shared-memory object (a ray.experimental.channel) that it rewrites every step and its peers
read, so no actor call and no new object is made per step. An earlier design pushed each
step's logits to every peer with an actor call; benchmarks/exchange.py keeps it as
`actor_push` and measures it at about 5x the latency of a bare gloo all_gather, against
0.55x for the channels (K = 2, README's Performance section). `collective` is an all_gather
over torch.distributed (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

from typing import Sequence

import ray
import torch
import torch.distributed as dist


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
    """An owned copy: the value may view the shared buffer, which the next write reuses."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return torch.from_numpy(value.copy())


class StoreExchange:
    """Each student writes its logits into one object-store channel that its K-1 peers read.

    A channel (ray.experimental.channel) is a mutable object in the Ray object store: written
    in place every step, no actor call, no new object per step. Peers on the writer's node
    read the same buffer; Ray pushes each write to one buffer per other node. One slot: a
    write waits until every reader has taken the previous value, so the members move in
    lockstep, as a cohort does, and the step key is implied by the order of calls.
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
        self.mine.write(_to_wire(self._own.cpu()), timeout=self.timeout)

    def gather(self, key: tuple) -> list[torch.Tensor]:
        out = []
        for j, channel in enumerate(self.channels):
            if j == self.rank:
                out.append(self._own)
                continue
            value = _from_wire(channel.read(timeout=self.timeout))
            out.append(value.to(self.device, non_blocking=True))
        self._own = None
        return out

    def close(self) -> None:
        self.mine.close()


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
