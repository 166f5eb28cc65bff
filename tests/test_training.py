"""Training: losses go down, HART's training tricks do what they say, trainers write loadable folders."""

import json
import os

import pytest
import torch

from hart_pipeline import HARTHybridTokenizer, HARTPipeline, HARTResidualHead, HARTResidualScheduler, HARTTransformer
from hart_pipeline.training import losses
from hart_pipeline.training.data import SyntheticShapesDataset, collate

PATCH_NUMS = (1, 2, 3, 4)


def tiny_tokenizer():
    torch.manual_seed(0)  # 32px images, 8x downsampling -> 4x4 latent
    return HARTHybridTokenizer(latent_channels=8, vocab_size=64, base_channels=32, channel_multipliers=(1, 1, 2, 2),
                               num_res_blocks=1, patch_nums=PATCH_NUMS)


def batch(n=8, size=32, seed=0):
    return collate([SyntheticShapesDataset(64, size, seed)[i] for i in range(n)])


def test_dataset_is_deterministic_and_captioned():
    a, b = SyntheticShapesDataset(10, 32, seed=3), SyntheticShapesDataset(10, 32, seed=3)
    assert torch.equal(a[4]["image"], b[4]["image"]) and a[4]["caption"] == b[4]["caption"]
    item = a[4]
    assert item["image"].shape == (3, 32, 32) and -1 <= item["image"].min() and item["image"].max() <= 1
    colours_in_caption = [attr[1] for attr in item["attributes"] if attr[1] in item["caption"]]
    assert colours_in_caption, (item["caption"], item["attributes"])
    captions = {SyntheticShapesDataset(200, 32, seed=0)[i]["caption"] for i in range(200)}
    assert len(captions) > 100  # varied wording, not one template


def test_tokenizer_training_steps_lower_the_loss():
    tokenizer = tiny_tokenizer()
    images = batch()["image"]
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=2e-3)
    history = []
    for step in range(30):
        out = losses.tokenizer_loss(tokenizer, images, use_continuous=step % 2 == 0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.recon_loss.item(), out.vq_loss.item()))
    first, last = history[:4], history[-4:]
    assert sum(r for r, _ in last) < 0.8 * sum(r for r, _ in first)
    assert [tuple(i.shape) for i in out.indices] == [(8, pn * pn) for pn in PATCH_NUMS]


def test_alternating_decoder_input_alternates():
    tokenizer = tiny_tokenizer()
    images = batch(2)["image"]
    g = torch.Generator().manual_seed(0)
    choices = [losses.tokenizer_loss(tokenizer, images, generator=g).used_continuous for _ in range(40)]
    assert 10 <= sum(choices) <= 30  # p = 0.5: both decoder inputs are used, about half each
    with torch.no_grad():
        full = losses.tokenizer_loss(tokenizer, images, use_continuous=True).reconstruction
        discrete = losses.tokenizer_loss(tokenizer, images, use_continuous=False).reconstruction
        latent = tokenizer.encode_latent(images)
        tokens = tokenizer.encode(images)
        expect_discrete = tokenizer.decoder(tokenizer.post_quant_conv(tokenizer.quantizer.indices_to_latent(tokens.indices, PATCH_NUMS)))
        expect_full = tokenizer.decoder(tokenizer.post_quant_conv(latent))
    assert torch.allclose(discrete, expect_discrete, atol=1e-4)  # the decoder really saw the discrete-only latent
    assert torch.allclose(full, expect_full, atol=1e-4)  # ... and here the full continuous latent


def _transformer_setup():
    tokenizer = tiny_tokenizer().eval().requires_grad_(False)
    torch.manual_seed(1)
    transformer = HARTTransformer(latent_channels=8, vocab_size=64, embed_dim=64, num_layers=2, num_heads=4,
                                  context_tokens=6, context_dim=16, patch_nums=PATCH_NUMS)
    head = HARTResidualHead(latent_channels=8, condition_dim=64, width=32, num_layers=2)
    scheduler = HARTResidualScheduler()
    scheduler.set_timesteps(1000)
    images = batch()["image"]
    with torch.no_grad():
        tokens = tokenizer.encode(images)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(8, 6, 16, generator=g)
    positions = torch.arange(6)[None].repeat(8, 1)
    return tokenizer, transformer, head, scheduler.tables, context, positions, tokens


def test_transformer_training_steps_lower_both_losses():
    tokenizer, transformer, head, tables, context, positions, tokens = _transformer_setup()
    optimizer = torch.optim.AdamW(list(transformer.parameters()) + list(head.parameters()), lr=3e-3)
    history = []
    for step in range(25):
        out = losses.transformer_loss(transformer, head, tokenizer, tables, context, positions, tokens.indices,
                                      tokens.residual, cond_drop_prob=0.0, generator=torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.ce_loss.item(), out.diffusion_loss.item()))
    ce_first, ce_last = sum(c for c, _ in history[:3]), sum(c for c, _ in history[-3:])
    diff_first, diff_last = sum(d for _, d in history[:3]), sum(d for _, d in history[-3:])
    assert ce_last < 0.8 * ce_first and diff_last < diff_first


@pytest.mark.parametrize("num_tokens, kept", [(16, 16), (64, 32)])
def test_token_dropping_keeps_at_least_32(num_tokens, kept):
    positions = losses.sample_kept_positions(3, num_tokens, generator=torch.Generator().manual_seed(0))
    assert positions.shape == (3, kept)
    assert all(torch.equal(row, row.unique()) for row in positions)  # ascending, distinct


def test_token_dropping_rate_follows_the_truncated_normal():
    g = torch.Generator().manual_seed(0)
    kept = torch.tensor([losses.sample_kept_positions(1, 4096, generator=g).shape[1] for _ in range(400)]) / 4096
    # mask rate ~ N(1, 0.25) truncated to [0.5, 1]: mean 1 - 0.25 (phi(0) - phi(-2)) / (Phi(0) - Phi(-2)) = 0.8193
    assert abs((1 - kept).mean().item() - 0.8193) < 0.015
    assert kept.max() <= 0.5 and kept.min() >= 0  # never more than half kept, spread over the range
    assert kept.std() > 0.08


def test_dropped_tokens_leave_the_pass_and_the_head_sees_every_kept_token():
    tokenizer, transformer, head, tables, context, positions, tokens = _transformer_setup()
    kept = torch.tensor([[0, 3, 5, 9, 15]] * 8)
    seen = {}
    original = losses.diffusion_loss

    def spy(head, tables, x0, condition, timesteps=None, noise=None, generator=None):
        seen["rows"] = x0.shape[0]
        return original(head, tables, x0, condition, timesteps=timesteps, noise=noise, generator=generator)

    losses.diffusion_loss = spy
    try:
        out = losses.transformer_loss(transformer, head, tokenizer, tables, context, positions, tokens.indices,
                                      tokens.residual, diffusion_batch_mul=4, cond_drop_prob=0.0,
                                      draws=losses.TransformerTrainingDraws(kept_positions=kept))
    finally:
        losses.diffusion_loss = original
    assert out.num_kept == 5 and out.logits.shape[1] == 1 + 4 + 9 + 5
    assert seen["rows"] == 8 * 5 * 4  # B x every kept final-scale token x diffusion_batch_mul
    # earlier scales are untouched; kept final-scale tokens see only earlier scales and each other
    with torch.no_grad():
        scale_inputs = tokenizer.quantizer.teacher_forcing_input(tokens.indices, PATCH_NUMS)
        full = transformer(context, positions, scale_inputs, PATCH_NUMS).logits
    assert torch.allclose(out.logits[:, :14], full[:, :14], atol=1e-5)
    assert not torch.allclose(out.logits[:, 14:], full[:, 14 + kept[0]], atol=1e-3)  # fewer keys for the kept


def test_condition_dropout_zeroes_the_dropped_rows():
    tokenizer, transformer, head, tables, context, positions, tokens = _transformer_setup()
    out = losses.transformer_loss(transformer, head, tokenizer, tables, context, positions, tokens.indices,
                                  tokens.residual, cond_drop_prob=0.5, generator=torch.Generator().manual_seed(0))
    assert 0 < int(out.draws.dropped.sum()) < 8


def test_trainers_write_a_pipeline_folder_that_loads_and_resumes(tmp_path):
    from hart_pipeline.training import train_tokenizer, train_transformer

    common = ["--image_size", "32", "--num_samples", "16", "--batch_size", "4", "--num_threads", "1",
              "--checkpoint_every", "2", "--log_every", "1"]
    tok_dir, hart_dir = str(tmp_path / "tokenizer"), str(tmp_path / "hart")
    train_tokenizer.main(common + ["--output_dir", tok_dir, "--train_steps", "2", "--latent_channels", "8",
                                   "--vocab_size", "64", "--base_channels", "32", "--patch_nums", "1", "2", "3", "4"])
    args = common + ["--output_dir", hart_dir, "--tokenizer_path", os.path.join(tok_dir, "vae"), "--embed_dim", "64",
                     "--num_layers", "1", "--num_heads", "2", "--context_tokens", "8", "--head_width", "32",
                     "--head_layers", "1"]
    train_transformer.main(args + ["--train_steps", "2"])
    train_transformer.main(args + ["--train_steps", "3", "--resume", "latest"])
    with open(os.path.join(hart_dir, "train_summary.json")) as f:
        assert json.load(f)["steps"] == 3  # resumed at step 2, trained one more
    pipe = HARTPipeline.from_pretrained(hart_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle above a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_default_model_generates_offline():
    from hart_pipeline.default_model import load_default_pipeline

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and 0.02 < images.std() and images.max() <= 1
