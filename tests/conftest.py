import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Fewer helper processes and faster polling per Ray Train fit on a 2-core machine (the Train
# controller reads these from the environment ray.init starts it with): no preemption watcher,
# workers polled every 0.5 s. Set before any test module starts Ray.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import torch  # noqa: E402

# The test models are tiny: on 2 cores, one intra-op thread is faster and matches the
# single-threaded actors bit for bit.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from cohort.data import load_dataset
    return load_dataset("digits")


def tiny_cohort(output, **overrides):
    """A 2-student resnet8 cohort on digits small enough for a CPU test."""
    from cohort.config import CohortConfig
    settings = dict(method="dml", students=2, archs=["resnet8"], dataset="digits", epochs=2,
                    batch_size=64, lr=0.1, schedule="cosine", weight_decay=5e-4,
                    output=str(output), progress=False, device="cpu")
    settings.update(overrides)
    return CohortConfig(**settings)
