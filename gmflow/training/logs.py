"""Training logs: ``metrics.jsonl`` (one JSON object per log step) and optional TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger"]

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Append-only metrics on rank 0; a resumed run drops rows past the resumed step."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        enabled: bool,
        resume_step: int = 0,
        use_tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step > 0 and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step == 0 and self.path.is_file():
            self.path.unlink()
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1
                )
            except ImportError:  # tensorboard is optional at run time
                logger.warning("tensorboard is not installed; logging to metrics.jsonl only")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one row; non-finite floats are stored as null."""
        if not self.enabled:
            return
        row = {"step": step}
        for k, v in metrics.items():
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def add_image(self, tag: str, image_hwc: Any, step: int) -> None:
        """Log an (H, W, 3) uint8 image to TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
