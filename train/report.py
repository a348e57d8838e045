"""What a run leaves behind: metrics.jsonl (one JSON object per log or eval event, appended),
optional TensorBoard event files, curves.png and summary.json. Written by process 0 only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes JSON to a temporary sibling and renames it: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            # The last line of a killed run may be cut short.
            continue
    return out


class MetricsLog:
    """Appends events to metrics.jsonl; on resume from step s, first drops the events after s
    (they belong to the steps the run is about to redo). Mirrors scalars to TensorBoard when
    asked and tensorboardX is installed."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        resume_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = False,
    ):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, self.path)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning(
                    "run.tensorboard=True but tensorboardX is not installed; "
                    "writing metrics.jsonl only (pip install tensorboardX)"
                )
            else:
                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, event: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        if self.tb is not None:
            for key, value in event.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, event["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(events: Iterable[dict], path: str | Path, title: str = "") -> None:
    """Loss (train, val) and top-1 accuracy (train, val) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = list(events)
    train = [e for e in events if "train_loss" in e]
    val = [e for e in events if "val_loss" in e]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    names = {"train": "train (smoothed labels)", "val": "val"}
    for rows, prefix, style in ((train, "train", "-"), (val, "val", "o-")):
        if rows:
            steps = [e["step"] for e in rows]
            ax_loss.plot(steps, [e[f"{prefix}_loss"] for e in rows], style, label=names[prefix])
            ax_acc.plot(steps, [e[f"{prefix}_top1"] for e in rows], style, label=f"{prefix} top-1")
            if prefix == "val":
                ax_acc.plot(
                    steps, [e["val_top5"] for e in rows], "s--", label="val top-5", alpha=0.6
                )
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
