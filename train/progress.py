"""The training progress bar of the tasks that train (personalize, steer): optimizer steps, not epochs."""
from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole run reading ``step k/max_steps`` (k = ``trainer.global_step``, optimizer steps).

    Our tasks train for ``max_steps`` over an endless (or one-epoch) stream, so Lightning's per-epoch bars say
    nothing useful ("Epoch 0/-2" with ``max_epochs=-1``). A resumed run starts the bar at its checkpoint's step;
    with gradient accumulation the bar advances once per optimizer step.
    """

    TRAIN_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    def init_train_tqdm(self) -> Tqdm:
        max_steps = self.trainer.max_steps
        return Tqdm(
            desc="step",
            total=max_steps if max_steps > 0 else None,
            initial=self.trainer.global_step,  # a resumed run's checkpoint step (restored before training starts)
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.TRAIN_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """One bar for all epochs: nothing to reset."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and step != bar.n and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the line

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The bar stays open across epochs (closed in ``on_train_end``)."""
