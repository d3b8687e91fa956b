"""The logit transports on their own: exact values, step keys checked, failures classified,
and the `store` -> `refs` fallback when Ray's channel API is missing or changed."""
import socket
import sys
import time
import types

import numpy as np
import pytest
import ray
import torch

from cohort.ray import exchange
from cohort.ray.exchange import (CollectiveExchange, ExchangeFailed, RefsExchange, StepMismatch,
                                 StoreExchange, channel_api_problem, resolve_exchange)

B, C = 8, 5


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # address="local": a cluster of its own, even when another session on this machine runs one
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Member is defined here, and Ray's workers cannot import test modules: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


class Member:
    """A student without a model: one transport, wired the way StudentWorker wires it."""

    def __init__(self, rank: int):
        torch.set_num_threads(1)
        self.rank, self.exchange = rank, None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def rendezvous(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return "127.0.0.1", s.getsockname()[1]

    def open_channel(self, peers, nodes):
        self._channel = StoreExchange.open(self.rank, peers, nodes, 4 * B * C)
        return self._channel

    def connect(self, transport: str, wiring, world: int, timeout: float, inline_bytes: int) -> None:
        cpu = torch.device("cpu")
        if transport == "store":
            self.exchange = StoreExchange(self.rank, self._channel, wiring, cpu, timeout)
        elif transport == "refs":
            self.exchange = RefsExchange(self.rank, wiring, cpu, timeout, inline_bytes)
        else:
            self.exchange = CollectiveExchange(self.rank, world, wiring, cpu, timeout)

    def deliver_logits(self, sender, count, key, payload) -> None:
        self.exchange.deliver(sender, count, key, payload)

    def step(self, publish_key, gather_key, logits):
        if publish_key is not None:
            self.exchange.publish(publish_key, torch.from_numpy(logits))
        return [t.numpy() for t in self.exchange.gather(gather_key)]

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None


TRANSPORTS = [("store", 0), ("refs", exchange.INLINE_BYTES), ("refs", 0), ("collective", 0)]
IDS = ["store", "refs-inline", "refs-put", "collective"]


@pytest.fixture(scope="module")
def pool(ray_cluster):
    """Three members, wired anew by every test (starting actors is most of these tests' time)."""
    return [ray.remote(Member).options(num_cpus=0, max_concurrency=2).remote(r) for r in range(3)]


@pytest.fixture(autouse=True)
def unwire(pool):
    yield
    ray.get([m.close.remote() for m in pool], timeout=60)


def cohort_of(pool, transport: str, world: int = 2, timeout: float = 30.0, inline_bytes: int = 0):
    members = pool[:world]
    if transport == "store":
        nodes = ray.get([m.node.remote() for m in members])
        wiring = ray.get([m.open_channel.remote(members, nodes) for m in members])
    elif transport == "refs":
        wiring = members
    else:
        wiring = ray.get(members[0].rendezvous.remote())
    ray.get([m.connect.remote(transport, wiring, world, timeout, inline_bytes) for m in members])
    return members


def logits_of(rank: int, step: int) -> np.ndarray:
    return np.random.default_rng(100 * rank + step).standard_normal((B, C)).astype(np.float32)


def cause_of(ref):
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(ref, timeout=60)
    return info.value.cause


@pytest.mark.parametrize("transport, inline_bytes", TRANSPORTS, ids=IDS)
def test_exact_logits_step_after_step_and_another_steps_logits_fail_naming_both_keys(
        pool, transport, inline_bytes):
    """K = 3: two steps deliver every member's logits bit for bit; in the third, student1
    publishes (0, 9) while its peers are at (0, 2), and every member refuses what it got."""
    members = cohort_of(pool, transport, world=3, inline_bytes=inline_bytes)
    for step in range(2):
        key = (0, step)
        got = ray.get([m.step.remote(key, key, logits_of(r, step)) for r, m in enumerate(members)])
        for gathered in got:
            assert len(gathered) == 3
            for rank, value in enumerate(gathered):
                np.testing.assert_array_equal(value, logits_of(rank, step))
    keys = [(0, 2), (0, 9), (0, 2)]
    refs = [m.step.remote(key, key, logits_of(r, 2)) for r, (m, key) in enumerate(zip(members, keys))]
    failures = [cause_of(ref) for ref in refs]
    assert all(isinstance(f, StepMismatch) for f in failures), failures
    assert str(failures[0]) == ("student0 expected the logits of (epoch, step) (0, 2) but student1 "
                                "sent (0, 9); nothing was trained on them")
    assert "student1 expected the logits of (epoch, step) (0, 9) but student0 sent (0, 2)" in str(failures[1])
    assert "student2 expected the logits of (epoch, step) (0, 2) but student1 sent (0, 9)" in str(failures[2])


@pytest.mark.parametrize("transport, inline_bytes", [TRANSPORTS[0], TRANSPORTS[2], TRANSPORTS[3]],
                         ids=["store", "refs", "collective"])
def test_a_peer_that_never_publishes_is_an_exchange_failure_after_the_timeout(pool, transport,
                                                                             inline_bytes):
    members = cohort_of(pool, transport, timeout=1.0, inline_bytes=inline_bytes)
    started = time.monotonic()
    failure = cause_of(members[0].step.remote((2, 0), (2, 0), logits_of(0, 0)))
    assert isinstance(failure, ExchangeFailed), repr(failure)
    assert "of step (2, 0)" in str(failure) and len(str(failure).splitlines()) == 1
    assert 0.9 < time.monotonic() - started < 30


def test_this_rays_channel_api_is_the_one_store_uses():
    assert channel_api_problem() is None
    assert resolve_exchange("store") == "store"


def fake_channel_module(monkeypatch, channel_class):
    module = types.ModuleType("ray.experimental.channel.shared_memory_channel")
    if channel_class is not None:
        module.Channel = channel_class
    monkeypatch.setitem(sys.modules, "ray.experimental.channel.shared_memory_channel", module)


class RenamedRead:
    def __init__(self, writer, reader_and_node_list, typ=None):
        pass

    def write(self, value, timeout=None):
        pass

    def read(self, timeout_ms=None):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("channel_class, problem", [
    (None, "has no usable ray.experimental.channel"),
    (RenamedRead, "channel read() takes ('timeout_ms',), not ('timeout',)"),
], ids=["missing", "changed"])
def test_store_falls_back_to_refs_in_one_line_when_the_channel_api_is_unusable(
        monkeypatch, capsys, channel_class, problem):
    fake_channel_module(monkeypatch, channel_class)
    assert problem in channel_api_problem()
    assert resolve_exchange("store") == "refs"
    assert resolve_exchange("collective") == "collective"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("--exchange store: ") and problem in out[0]
    assert out[0].endswith("using --exchange refs (public Ray APIs only)")
