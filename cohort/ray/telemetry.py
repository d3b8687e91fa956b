"""Live training metrics for the Ray dashboard and each node's Prometheus endpoint.

Gauges from ray.util.metrics, tagged with run, method and member, so a cohort's students,
ONE's branches and Train workers show up side by side (exported as `ray_cohort_*`).
Updates are throttled: setting a gauge is cheap, but there is no need to do it every step.
"""
from __future__ import annotations

import time

from ray.util.metrics import Gauge

TAG_KEYS = ("run", "method", "member")
GAUGES = {
    "train_loss": "Training loss of the member (mean over recent steps).",
    "test_accuracy": "Test top-1 accuracy (%) after the last epoch.",
    "images_per_second": "Training images per second of the member.",
    "step_seconds": "Wall time of one training step.",
    "exchange_seconds": "Exposed time per step waiting for the peers' logits.",
    "epoch": "Epochs completed.",
}
_registry: dict[str, Gauge] = {}


def _gauge(name: str) -> Gauge:
    if name not in _registry:  # one Gauge object per process and name
        _registry[name] = Gauge(f"cohort_{name}", description=GAUGES[name], tag_keys=TAG_KEYS)
    return _registry[name]


class Telemetry:
    """The gauges of one member (a student, a branch, a worker)."""

    def __init__(self, run: str, method: str, member: str, every_seconds: float = 2.0):
        self.tags = {"run": run, "method": method, "member": member}
        self.every = every_seconds
        self._last = 0.0
        self._window = [0.0, 0.0, 0.0, 0.0, 0]  # loss, step s, exchange s, images, steps
        self._exchanges = False   # a Train worker has no logit exchange: its gauge stays unset

    def step(self, loss: float, step_seconds: float, exchange_seconds: float | None,
             images: int) -> None:
        w = self._window
        w[0] += loss
        w[1] += step_seconds
        if exchange_seconds is not None:
            w[2] += exchange_seconds
            self._exchanges = True
        w[3] += images
        w[4] += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            self.flush()
            self._last = now

    def flush(self) -> None:
        loss, step_s, exchange_s, images, steps = self._window
        if steps:
            self.set(train_loss=loss / steps, step_seconds=step_s / steps,
                     images_per_second=images / max(step_s, 1e-9))
            if self._exchanges:
                self.set(exchange_seconds=exchange_s / steps)
        self._window = [0.0, 0.0, 0.0, 0.0, 0]

    def set(self, **values: float) -> None:
        for name, value in values.items():
            _gauge(name).set(float(value), tags=self.tags)
