"""Training code for HART components (tokenizer, transformer + residual head) on CPU or GPU(s).

The trainers are ``python -m hart_pipeline.training.train_tokenizer`` and
``python -m hart_pipeline.training.train_transformer``; see ``examples/training/README.md``.
"""

from .data import SyntheticShapesDataset, collate
from .checkpoint import CheckpointError
from .losses import (
    TransformerTrainingDraws,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    normal_kl,
    sample_kept_positions,
    tokenizer_loss,
    transformer_loss,
)
from .utils import EMA

__all__ = [
    "CheckpointError",
    "EMA",
    "TransformerTrainingDraws",
    "SyntheticShapesDataset",
    "collate",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "sample_kept_positions",
    "tokenizer_loss",
    "transformer_loss",
]
