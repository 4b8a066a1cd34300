"""The tasks' training bar counts optimizer steps against max_steps, across epochs, without a terminal."""
from __future__ import annotations

import lightning as L
import torch

from dreamsteer.train.progress import StepProgressBar


class _Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bar_reads_optimizer_steps_over_max_steps_across_epochs(capsys):
    # 4 batches per epoch, 2 batches per optimizer step: 3 steps span 2 epochs (6 batches)
    trainer = L.Trainer(
        max_steps=3, max_epochs=-1, accumulate_grad_batches=2, callbacks=[StepProgressBar()], accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(_Regression(), torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=1))
    states = [s.strip() for s in capsys.readouterr().out.replace("\n", "\r").split("\r") if s.strip()]
    shown = [s.split(" |")[0] for s in states]
    assert shown[0] == "step 0/3" and shown[-1] == "step 3/3", states
    assert set(shown) == {"step 0/3", "step 1/3", "step 2/3", "step 3/3"}, states
    assert "loss=" in states[-1] and not any("Epoch" in s for s in states)
