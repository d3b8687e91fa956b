"""Errors the jobs turn into one line and an exit code."""


class UsageError(ValueError):
    """A bad setting: the CLI prints `error: <flag>: <message>` and exits with code 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, foreign or from another run)."""


class TrainingDiverged(RuntimeError):
    """A NaN or infinite loss; names the member, epoch and step."""

    def __init__(self, member: str, epoch: int, step: int, value: float):
        super().__init__(
            f"non-finite loss {value} for member {member!r} at epoch {epoch}, step {step}; "
            "the run directory keeps the last good checkpoint")
        self.member, self.epoch, self.step, self.value = member, epoch, step, value

    def __reduce__(self):   # picklable, so it crosses process boundaries (Ray workers, actors)
        return (type(self), (self.member, self.epoch, self.step, self.value))


class RunFailed(RuntimeError):
    """A run that gave up (a member kept failing past --max-restarts); one line, exit code 1."""


class ResourceError(RuntimeError):
    """The cluster cannot fit what a run asks for; says what was asked and what exists."""
