"""``megadeep train`` in this process with one fault injected (tests/test_hardening.py):

    python tests/workers/faulty.py eval_crash|nan CONFIG [k=v ...]

eval_crash: the validation pass raises (after the last training step);
nan: every loss is NaN, so every step's gradient is non-finite and skipped.
"""
import sys

import torch

from megadeep.cli import main
from megadeep.model.llama import Transformer
from megadeep.training.trainer import Trainer


def crash(self):
    raise RuntimeError("injected: evaluation failed")


def nan_loss(forward):
    def patched(self, tokens, targets=None):
        out = forward(self, tokens, targets)
        return out * torch.tensor(float("nan")) if targets is not None else out
    return patched


if __name__ == "__main__":
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "eval_crash":
        Trainer.evaluate = crash
    elif mode == "nan":
        Transformer.forward = nan_loss(Transformer.forward)
    else:
        raise SystemExit(f"unknown mode {mode}")
    sys.exit(main(["train", *argv]))
