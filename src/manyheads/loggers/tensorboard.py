"""TensorBoard: every history column per epoch, the options as hyperparameters, the run's figures at the end.

Event files go to ``run_dir/tensorboard`` (without a run folder: torch's default ``runs/<time>_<host>``).
Tags group by head: ``val/age/mae`` is ``age/val/mae``, ``weight/age`` is ``age/weight``, other
columns (``lr``, ``seconds``) keep their names. The step is the epoch number, so a resumed
run carries on where it stopped (events of epochs it trains again are purged).

    mh.fit(net, df, run_dir="runs/faces", loggers=["tensorboard"])   # tensorboard --logdir runs/faces
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manyheads import columns
from manyheads.loggers.base import Logger, Run, flatten, numeric, register

if TYPE_CHECKING:
    from manyheads.result import TrainResult

FOLDER = "tensorboard"  # under the run folder
# the summary metrics shown against the hyperparameters (when the history has them)
SUMMARY = (columns.name("val", columns.TOTAL, "loss"), columns.name("train", columns.TOTAL, "loss"))


def tag(column: str) -> str:
    """The TensorBoard tag of a history column, grouped by head: ``val/age/mae`` -> ``age/val/mae``."""
    parsed = columns.parse(column)
    if parsed is not None:
        return f"{parsed.head}/{parsed.split}/{parsed.metric}"
    kind, _, head = column.partition("/")
    return f"{head}/weight" if kind == "weight" and head and columns.weight(head) == column else column


@register("tensorboard")
class TensorBoard(Logger):
    """Writes through ``torch.utils.tensorboard.SummaryWriter`` (``pip install "manyheads[tensorboard]"``).

    TensorBoard(log_dir="tb/faces")  # or fit(loggers=["tensorboard"]): run_dir/tensorboard
    """

    package = "tensorboard"
    extra = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None) -> None:
        self.log_dir = log_dir
        self.writer: Any = None
        self.run = Run()
        self.step = 0

    def start(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.step = run, run.epoch
        log_dir = self.log_dir or (run.run_dir / FOLDER if run.run_dir is not None else None)
        # a resume trains again from epoch run.epoch + 1: events a crash left past that are dropped
        self.writer = SummaryWriter(log_dir, purge_step=run.epoch + 1 if run.resumed else None)
        if not run.resumed:
            self._hyperparameters(run.options)

    def _hyperparameters(self, options: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(flatten(options), {tag(column): 0.0 for column in SUMMARY}):
            self.writer.file_writer.add_summary(summary)

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        for column, value in numeric(row).items():
            self.writer.add_scalar(tag(column), value, global_step=step)
        self.writer.flush()  # an epoch is minutes: show it now, and keep it if the run dies
        self.step = step

    def finish(self, result: TrainResult) -> None:
        if self.run.run_dir is not None:
            self._figures(self.run.run_dir)
        self.writer.close()

    def fail(self, error: BaseException) -> None:
        self.writer.close()  # the epochs logged so far are flushed to the event file

    def _figures(self, run_dir: Path) -> None:
        """Every PNG figure in the run folder (the learning curves, ...) as an image at the last step."""
        _add_images(self.writer, run_dir, sorted(run_dir.rglob("*.png")), self.step)

    @classmethod
    def add_files(cls, run_dir: Path, paths: list[Path]) -> None:
        """The report's figures, at the run's last step, in the run folder's event files."""
        from torch.utils.tensorboard import SummaryWriter

        figures = [path for path in paths if path.suffix == ".png"]
        history = run_dir / "history.csv"
        if not figures or not (run_dir / FOLDER).is_dir() or not history.is_file():
            return
        step = max(0, len(history.read_text().strip().splitlines()) - 1)  # epochs: the rows under the header
        writer = SummaryWriter(run_dir / FOLDER)
        _add_images(writer, run_dir, figures, step)
        writer.close()


def _add_images(writer: Any, run_dir: Path, paths: list[Path], step: int) -> None:
    import numpy as np
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        name = path.relative_to(run_dir).with_suffix("").as_posix()
        writer.add_image(f"figures/{name}", pixels, global_step=step, dataformats="HWC")
