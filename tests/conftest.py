import contextlib
import os

import pytest
import torch

from hart_pipeline import HARTHybridTokenizer, HARTResidualHead, HARTResidualScheduler, HARTTransformer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_PATCH_NUMS = (1, 2, 3, 4)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (norm weights and zero-initialised biases included) so all of them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_transformer(patch_nums=TINY_PATCH_NUMS, seed: int = 0) -> HARTTransformer:
    torch.manual_seed(seed)
    model = HARTTransformer(latent_channels=16, vocab_size=1024, embed_dim=64, num_layers=2, num_heads=4,
                            context_tokens=8, context_dim=32, patch_nums=patch_nums)
    return randomize_(model, seed).eval()


def tiny_head(seed: int = 0) -> HARTResidualHead:
    torch.manual_seed(seed)
    return randomize_(HARTResidualHead(latent_channels=16, condition_dim=64, width=32, num_layers=2), seed).eval()


def tiny_vae(patch_nums=TINY_PATCH_NUMS, seed: int = 0) -> HARTHybridTokenizer:
    torch.manual_seed(seed)
    model = HARTHybridTokenizer(latent_channels=16, vocab_size=1024, base_channels=32,
                                channel_multipliers=(1, 1, 1, 2, 2), patch_nums=patch_nums)
    return randomize_(model, seed, std=0.05).eval()


@pytest.fixture
def transformer():
    return tiny_transformer()


@pytest.fixture
def head():
    return tiny_head()


@pytest.fixture
def vae():
    return tiny_vae()


@pytest.fixture
def scheduler():
    return HARTResidualScheduler()


def teacher_forced_hidden_states(transformer, vae, context, position_ids, indices, patch_nums, guidance_scale=4.5):
    """Run the KV-cached loop with every scale given (teacher forcing); return the tokens and the
    last-block hidden states of each scale, as ``forward_scale`` produced them."""
    from hart_pipeline import generate_tokens

    with recorded_hidden_states(transformer) as hidden:
        tokens = generate_tokens(transformer, vae, context, position_ids, patch_nums=patch_nums,
                                 guidance_scale=guidance_scale, smooth=False, prefix_indices=indices)
    return tokens, hidden


@contextlib.contextmanager
def recorded_hidden_states(transformer):
    """Within the block, every ``forward_scale`` output of ``transformer`` is appended to the yielded list."""
    hidden = []
    original = transformer.forward_scale

    def record(*args, **kwargs):
        hidden.append(original(*args, **kwargs))
        return hidden[-1]

    transformer.forward_scale = record
    try:
        yield hidden
    finally:
        del transformer.forward_scale


def text_condition(batch: int = 2, tokens: int = 8, dim: int = 32, seed: int = 0):
    """Random right-padded text hidden states with the official position ids (pads repeat the last id)."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, dim, generator=g)
    lengths = torch.tensor([tokens - 3 * (i % 2) for i in range(batch)])
    mask = torch.arange(tokens)[None] < lengths[:, None]
    return context, mask.long().cumsum(1) - 1


WORDS = ["a", "an", "the", "red", "green", "blue", "circle", "square", "triangle", "above", "below", "left", "right",
         "of", "lemur", "in", "magician", "hat", "two", "three", "and"]


def tiny_text_tokenizer():
    """A word-level fast tokenizer built offline (no hub download), with a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    for ch in ":,.\"-!>":
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def tiny_text_encoder(hidden_size: int = 32, seed: int = 0):
    """A 1-layer random Qwen2 body (the released model's text-encoder family)."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2Model(config).eval()


def tiny_pipeline(patch_nums=TINY_PATCH_NUMS, use_system_prompt: bool = True):
    from hart_pipeline import HARTPipeline

    return HARTPipeline(tokenizer=tiny_text_tokenizer(), text_encoder=tiny_text_encoder(), vae=tiny_vae(patch_nums),
                        transformer=tiny_transformer(patch_nums), residual_head=tiny_head(),
                        scheduler=HARTResidualScheduler(), use_system_prompt=use_system_prompt)


@pytest.fixture(scope="module")
def pipe():
    """A tiny random HARTPipeline with its progress bar off, one per test module (modules may override it)."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The start of a script for a fresh interpreter that cannot import this package (it is pip-installed editable
# here, so a meta-path blocker refuses it) and sees no PYTHONPATH: only a saved folder's own code can load.
WITHOUT_PACKAGE_PRELUDE = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hart_pipeline", "comfy_nodes"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", ".") and "wt" not in p.split("/")]
"""


def attn_l2_norm_checkpoint(dst: str) -> str:
    """The tiny4 official parity checkpoint with the official ``attn_l2_norm`` switched on: ``attn_l2_norm: true``
    in its config and a ``scale_mul_1H11`` per block (log 4 + 0.5 randn, Generator seed 11), in both weight files.
    Its official sampling is recorded in ``fixtures/parity/tiny4/attn_l2_norm.safetensors``."""
    import json
    import shutil

    shutil.copytree(os.path.join(FIXTURES, "parity", "tiny4", "official"), dst)
    llm = os.path.join(dst, "llm")
    with open(os.path.join(llm, "config.json")) as f:
        config = json.load(f)
    config["attn_l2_norm"] = True
    with open(os.path.join(llm, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    g = torch.Generator().manual_seed(11)
    scales = [torch.full((1, config["num_heads"], 1, 1), 4.0).log() + 0.5 * torch.randn(1, config["num_heads"], 1, 1,
                                                                                        generator=g)
              for _ in range(config["depth"])]
    for name in ("ema_model.bin", "pytorch_model.bin"):
        path = os.path.join(llm, name)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state.update({f"blocks.{i}.attn.scale_mul_1H11": s.clone() for i, s in enumerate(scales)})
        torch.save(state, path)
    return dst
