"""Where methods run. `run(cfg)` trains any registered method: a cohort as Ray actors
(cohort.ray.actors) or in this process (local), one network on Ray Train (cohort.ray.train)
or in this process (local), a chain stage by stage (chain). Validation happens first; nothing
starts or is written before every setting has been checked."""
from __future__ import annotations

from .. import methods
from ..config import validate, validate_against_data
from ..data import Dataset
from ..devices import check_gpu_settings
from ..runs import RunDir
from .common import load_data, prepare_run


def run(cfg, dataset: Dataset | None = None, *, on_epoch=None, callbacks: list | None = None,
        method=None) -> dict:
    """Train `cfg`'s method; returns the summary. `on_epoch(rows)` sees every epoch's rows
    (cohorts, and networks in this process); `callbacks` are Ray Train callbacks (a sweep's
    forwarder to Tune); `method` replaces the registered method instance (tests inject
    faults this way)."""
    family = methods.get(cfg.method).family
    check_gpu_settings(cfg)   # GPU settings Ray or NCCL would refuse, before anything is written
    if family == "cohort":
        if cfg.runtime == "local":
            from .local import run_cohort
            return run_cohort(cfg, dataset, on_epoch)
        from ..ray.actors import run_ray
        return run_ray(cfg, dataset, on_epoch)
    if family == "chain":
        from .chain import run_chain
        return run_chain(cfg, dataset, callbacks)
    run_dir, dataset = prepare_run(cfg, dataset)
    return run_network(method or methods.of(cfg), run_dir, dataset, on_epoch, callbacks)


def run_network(method, run_dir: RunDir, dataset: Dataset, on_epoch=None, callbacks=None) -> dict:
    """One NetworkMethod into a planned run directory, on Ray Train or in this process."""
    if method.cfg.runtime == "local":
        from .local import run_network as local
        return local(method, run_dir, dataset, on_epoch)
    from ..ray.train import run_train_job
    return run_train_job(method, run_dir, dataset, callbacks)


__all__ = ["run", "run_network", "load_data", "prepare_run", "validate", "validate_against_data"]
