"""Progress output: one line per epoch for every job, a bar over steps on a terminal."""
from __future__ import annotations

import sys

from tqdm import tqdm


def step_bar(total: int, description: str, enabled: bool = True):
    """A tqdm bar over steps when stdout is a terminal; a no-op otherwise."""
    return tqdm(total=total, desc=description, leave=False,
                disable=not (enabled and sys.stdout.isatty()))


def epoch_line(run_name: str, epoch: int, epochs: int, rows: list[dict]) -> str:
    parts = []
    for row in rows:
        loss = row.get("train_loss")
        loss_text = f" loss {loss:.3f}" if isinstance(loss, float) else ""
        parts.append(f"{row['member']}{loss_text} acc {row['test_acc']:.2f}")
    speed = sum(r.get("images_per_second") or 0.0 for r in rows if r["member"] != "ensemble")
    seconds = rows[0].get("epoch_seconds", 0.0) if rows else 0.0
    return (f"[{run_name}] epoch {epoch + 1}/{epochs} ({seconds:.1f}s, {speed:.0f} img/s) | "
            + " | ".join(parts))


def say(line: str) -> None:
    print(line, flush=True)
