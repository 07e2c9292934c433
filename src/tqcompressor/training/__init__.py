"""Distillation training: ``Trainer`` (``trainer``) runs ``step``, ``evaluation`` and ``checkpoint``
under the settings of ``config``."""

from .checkpoint import CHECKPOINT
from .config import TrainConfig
from .trainer import FINAL, LOG, METRICS, Trainer, process_state

__all__ = ["CHECKPOINT", "FINAL", "LOG", "METRICS", "TrainConfig", "Trainer", "process_state"]
