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


def text_condition(batch: int = 2, tokens: int = 8, dim: int = 32, seed: int = 0):
    """Random right-padded text hidden states with the official position ids (pads repeat the last id)."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, dim, generator=g)
    lengths = torch.tensor([tokens - 3 * (i % 2) for i in range(batch)])
    mask = torch.arange(tokens)[None] < lengths[:, None]
    return context, mask.long().cumsum(1) - 1
