"""One rank of the 2-process DDP test (run by torch.distributed.run): Trainer on gloo, CPU only.

Writes ``rank{N}.json`` into the directory given as its only argument.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import Trainer

from lighthouse_hf import RecoveryCallback
from helpers import count_lighthouse_calls
from training_helpers import PhaseProbe, RandomBlocks, tiny_lighthouse_model, training_args


def main(output_dir: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        probe = PhaseProbe(count_lighthouse_calls(patch.setattr))
        trainer = Trainer(
            model=tiny_lighthouse_model(),
            args=training_args(output_dir / "run", max_steps=3, ddp_backend="gloo", ddp_find_unused_parameters=False),
            train_dataset=RandomBlocks(8),
            callbacks=[RecoveryCallback(at=2), probe],
        )
        trainer.train()
    checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
    report = dict(
        world_size=dist.get_world_size(),
        implementations=probe.implementations,
        lighthouse_calls=probe.lighthouse_calls,
        recovery_step=trainer.model.config.lighthouse["recovery_step"],
        weight_checksum=round(checksum, 6),
    )
    (output_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    try:
        main(Path(sys.argv[1]))
    finally:
        # Exiting with the group alive let gloo's threads abort a rank at shutdown now and then
        # ("terminate called without an active exception", exit code -6).
        if dist.is_initialized():
            dist.destroy_process_group()
