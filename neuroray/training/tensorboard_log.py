"""The run's metrics as TensorBoard event files (``tensorboard=true``; the optional ``tensorboard`` extra).

Every row written to metrics.jsonl is mirrored, so TensorBoard shows exactly what the log holds:
training rows as ``train/loss``, ``train/lr``, ``train/tokens_per_s`` and ``comm/sync_bytes``,
``comm/control_bytes`` (counted so far), held-out rows as ``eval/loss`` and ``eval/perplexity``, each at
its inner step. Writes go through ``torch.utils.tensorboard.SummaryWriter``, which needs the
``tensorboard`` package: ``pip install 'neuroray[tensorboard]'``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from neuroray.training.preflight import DependencyError

INSTALL = "pip install 'neuroray[tensorboard]'"
# metrics.jsonl key -> TensorBoard tag
TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
        "sync_bytes": "comm/sync_bytes", "control_bytes": "comm/control_bytes",
        "eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity"}


def check_available() -> None:
    """Refuse ``tensorboard=true`` before the run starts when the package is absent (one line, the fix)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise DependencyError(f"tensorboard=true needs the tensorboard package: {INSTALL} "
                                 "(or run with tensorboard=false)")


class TensorBoardLog:
    """A SummaryWriter on ``<run_dir>/tensorboard`` that takes metrics.jsonl rows."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step (resume): TensorBoard hides events at or after it written by the run being continued
        self.dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)

    def row(self, row: dict) -> None:
        step = int(row["step"])
        for key, tag in TAGS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MirroredLog:
    """metrics.jsonl as the loop writes it (a text file of JSON lines), each row also sent to TensorBoard."""

    def __init__(self, file, board: TensorBoardLog | None):
        self.file, self.board, self._partial = file, board, ""

    def write(self, text: str) -> int:
        written = self.file.write(text)
        if self.board is not None:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                if line.strip():
                    self.board.row(json.loads(line))
        return written

    def flush(self) -> None:
        self.file.flush()
        if self.board is not None:
            self.board.flush()
