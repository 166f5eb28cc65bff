"""Training: losses go down, HART's training tricks do what they say, trainers write loadable folders."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hart_pipeline import HARTHybridTokenizer, HARTPipeline, HARTResidualHead, HARTResidualScheduler, HARTTransformer
from hart_pipeline.training import losses
from hart_pipeline.training.data import LAYOUT_WEIGHTS, SyntheticShapesDataset, collate

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


def test_layout_weights_set_the_mix_and_name_their_mistakes():
    def objects(weights):
        data = SyntheticShapesDataset(300, 32, seed=4, layout_weights=weights)
        return [len(data.item(i).attributes) for i in range(300)]

    assert set(objects((1, 0, 0))) == {1}
    relation_only = SyntheticShapesDataset(50, 32, seed=4, layout_weights=(0, 1, 0))
    assert all(len({a[1] for a in relation_only.item(i).attributes}) == 2 for i in range(50))  # two colours
    mixed = objects((0.2, 0.6, 0.2))
    relation_heavy = sum(n == 2 for n in mixed) / len(mixed)  # count scenes with two objects are 0.2 * 0.5
    assert 0.6 <= relation_heavy <= 0.8, relation_heavy
    default, explicit = SyntheticShapesDataset(40, 32, seed=4), SyntheticShapesDataset(40, 32, seed=4, layout_weights=LAYOUT_WEIGHTS)
    assert [default.caption(i) for i in range(40)] == [explicit.caption(i) for i in range(40)]
    for bad in ((1, 2), (1, -1, 1), (0, 0, 0), (1, float("nan"), 1)):
        with pytest.raises(ValueError, match="layout_weights must be 3 non-negative numbers"):
            SyntheticShapesDataset(4, 32, layout_weights=bad)


def test_layout_weights_get_their_own_training_cache():
    from hart_pipeline.training import train_transformer

    parse = train_transformer.build_parser().parse_args
    assert train_transformer._stream_tag(parse([])) == ""  # the default stream keeps its existing caches
    heavy = train_transformer._stream_tag(parse(["--layout_weights", "0.2", "0.6", "0.2"]))
    assert heavy == "_l0.2-0.6-0.2"
    assert train_transformer.training_dataset(parse(["--layout_weights", "0", "1", "0", "--num_samples", "3"])).layout_weights == (0, 1, 0)
    with pytest.raises(ValueError, match="layout_weights"):
        train_transformer.main(["--layout_weights", "1", "1", "-1", "--output_dir", "unused"])


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


def test_scale_loss_weights_weight_each_scales_ce():
    """Uniform weights are the official loss; other weights are the per-scale weighted mean CE."""
    tokenizer, transformer, head, tables, context, positions, tokens = _transformer_setup()
    kept = torch.tensor([[0, 3, 5, 9, 15]] * 8)

    def loss(weights):
        return losses.transformer_loss(transformer, head, tokenizer, tables, context, positions, tokens.indices,
                                       tokens.residual, cond_drop_prob=0.0, scale_loss_weights=weights,
                                       generator=torch.Generator().manual_seed(0),
                                       draws=losses.TransformerTrainingDraws(kept_positions=kept))

    plain, uniform, coarse = loss(None), loss([1.0] * len(PATCH_NUMS)), loss([1.0] + [0.0] * (len(PATCH_NUMS) - 1))
    assert torch.allclose(uniform.loss, plain.loss, atol=1e-6)
    assert torch.equal(coarse.ce_loss, plain.ce_loss)  # the logged CE stays the plain mean
    ce_first = torch.nn.functional.cross_entropy(plain.logits[:, 0], tokens.indices[0][:, 0])  # scale 1 = 1 token
    assert torch.allclose(coarse.loss - coarse.diffusion_loss, ce_first, atol=1e-5)
    weights = losses.scale_token_weights([1, 8, 4, 2], PATCH_NUMS, num_kept=5)
    assert weights.tolist() == [1.0] + [8.0] * 4 + [4.0] * 9 + [2.0] * 5
    for bad in ([1, 1], [1, -1, 1, 1], [0, 0, 0, 0], [1, float("nan"), 1, 1]):
        with pytest.raises(ValueError, match="scale_loss_weights.*one finite weight >= 0 per scale"):
            losses.scale_token_weights(bad, PATCH_NUMS, num_kept=5)


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
                     "--head_layers", "1", "--attn_l2_norm"]
    train_transformer.main(args + ["--train_steps", "2"])
    train_transformer.main(args + ["--train_steps", "3", "--resume", "latest"])
    with open(os.path.join(hart_dir, "train_summary.json")) as f:
        assert json.load(f)["steps"] == 3  # resumed at step 2, trained one more
    pipe = HARTPipeline.from_pretrained(hart_dir)
    assert pipe.transformer.config.attn_l2_norm  # the learned temperatures were trained and saved
    assert not torch.allclose(pipe.transformer.blocks[0].attn.scale_mul_1H11, torch.tensor(4.0).log())
    with pytest.raises(ValueError, match="--attn_l2_norm builds a new transformer"):
        train_transformer.main(args + ["--pretrained_model", hart_dir, "--output_dir", str(tmp_path / "ft")])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle above a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_default_model_generates_offline():
    from hart_pipeline.default_model import load_default_pipeline

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and 0.02 < images.std() and images.max() <= 1


# ------------------------------------------------------------------------------------------------ trainers
COMMON = ["--image_size", "32", "--num_samples", "16", "--batch_size", "4", "--num_threads", "1", "--log_every", "1"]
TOKENIZER_ARGS = ["--latent_channels", "8", "--vocab_size", "64", "--base_channels", "32", "--patch_nums", "1", "2", "3", "4"]
TRANSFORMER_ARGS = ["--embed_dim", "64", "--num_layers", "1", "--num_heads", "2", "--context_tokens", "8",
                    "--head_width", "32", "--head_layers", "1", "--no_text_encoder_export"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each trainer run in this process starts its own accelerate state (e.g. another mixed precision)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    from hart_pipeline.training import train_tokenizer

    folder = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer.main(COMMON + TOKENIZER_ARGS + ["--output_dir", folder, "--train_steps", "1"])
    return os.path.join(folder, "vae")


def test_discrete_only_tokenizer_never_feeds_the_continuous_latent(tmp_path):
    from hart_pipeline.training import train_tokenizer

    out = str(tmp_path / "tok")
    train_tokenizer.main(COMMON + TOKENIZER_ARGS + ["--output_dir", out, "--train_steps", "3", "--continuous_prob", "1.0",
                                                   "--discrete_only", "--eval_every", "3", "--eval_samples", "2"])
    with open(os.path.join(out, "train_log.jsonl")) as f:
        assert [json.loads(line)["continuous_frac"] for line in f] == [0.0, 0.0, 0.0]
    assert os.path.exists(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))


def _files(root):
    return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]


def test_everything_written_is_safetensors_or_json_and_resume_never_unpickles(tmp_path, trained_tokenizer, monkeypatch):
    import pickle

    from hart_pipeline.training import train_transformer

    out = str(tmp_path / "hart")
    args = COMMON + TRANSFORMER_ARGS + ["--output_dir", out, "--tokenizer_path", trained_tokenizer, "--checkpoint_every", "2"]
    train_transformer.main(args + ["--train_steps", "2"])
    written = _files(out)
    # data is safetensors / JSON; the only code is the pipeline bundle save_pretrained writes (trust_remote_code)
    code = {"pipeline_hart.py", "vae/modeling_hart.py", "transformer/modeling_hart.py", "residual_head/modeling_hart.py",
            "scheduler/scheduling_hart.py"}
    data = [f for f in written if f not in code]
    assert set(written) & code == code
    assert data and all(f.endswith((".safetensors", ".json", ".jsonl", ".md")) for f in data), data
    with open(os.path.join(out, "checkpoints", "step_2", "checkpoint.json")) as f:
        manifest = json.load(f)["sha256"]
    assert set(manifest) == {"model.safetensors", "ema.safetensors", "optimizer_0.safetensors", "rng_0.safetensors",
                             "trainer_state.json"}
    # a planted pickle is never read, and nothing is unpickled on resume
    (tmp_path / "hart" / "checkpoints" / "step_2" / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04K\x01.")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during resume")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    train_transformer.main(args + ["--train_steps", "3", "--resume", "latest"])
    with open(os.path.join(out, "train_summary.json")) as f:
        assert json.load(f)["steps"] == 3


def test_resume_restores_the_exact_training_state(tmp_path, trained_tokenizer):
    """2 steps + resume + 2 steps == 4 steps in one go (weights, EMA, optimizer, LR schedule, RNG)."""
    from safetensors.torch import load_file

    from hart_pipeline.training import train_transformer

    def run(out, steps, resume=None):
        train_transformer.main(COMMON + TRANSFORMER_ARGS + ["--output_dir", out, "--tokenizer_path", trained_tokenizer,
                                                            "--checkpoint_every", "2", "--train_steps", str(steps),
                                                            "--cache_dir", str(tmp_path / "cache")]
                               + (["--resume", resume] if resume else []))
        return load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))

    straight = run(str(tmp_path / "a"), 4)
    run(str(tmp_path / "b"), 2)
    resumed = run(str(tmp_path / "b"), 4, "latest")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("damage, file", [("flip", "optimizer_0.safetensors"), ("truncate", "model.safetensors"),
                                          ("flip", "trainer_state.json"), ("delete", "checkpoint.json")])
def test_damaged_checkpoint_gives_an_error_naming_the_file(tmp_path, trained_tokenizer, damage, file):
    from hart_pipeline.training import train_transformer
    from hart_pipeline.training.checkpoint import CheckpointError

    out = str(tmp_path / "hart")
    args = COMMON + TRANSFORMER_ARGS + ["--output_dir", out, "--tokenizer_path", trained_tokenizer]
    train_transformer.main(args + ["--train_steps", "1"])
    path = os.path.join(out, "checkpoints", "step_1", file)
    data = open(path, "rb").read()
    if damage == "delete":
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2] if damage == "truncate" else data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        train_transformer.main(args + ["--train_steps", "2", "--resume", "latest"])


def test_lora_mode_writes_a_lora_file_and_card_that_load_and_push(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from hart_pipeline import hub
    from hart_pipeline.default_model import load_default_pipeline
    from hart_pipeline.training import train_transformer

    pushed = {}
    monkeypatch.setattr(hub, "push_folder", lambda folder, repo_id, allow_patterns=None: pushed.update(
        folder=folder, repo_id=repo_id, files=sorted(os.listdir(folder)), allow=allow_patterns))
    out = str(tmp_path / "lora")
    train_transformer.main(["--pretrained_model", "default", "--lora_rank", "4", "--output_dir", out,
                            "--image_size", "64", "--num_samples", "8", "--batch_size", "4", "--num_threads", "1",
                            "--train_steps", "3", "--learning_rate", "0.01", "--warmup_steps", "1",
                            "--push_to_hub", "me/hart-shapes-lora"])
    weights = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith(("transformer.", "residual_head.")) and "lora_" in k for k in weights)
    card = open(os.path.join(out, "README.md")).read()
    assert "load_default_pipeline()" in card and "load_lora_weights" in card and "- lora" in card
    assert pushed["repo_id"] == "me/hart-shapes-lora" and "pytorch_lora_weights.safetensors" in pushed["allow"]
    checkpoint = load_file(os.path.join(out, "checkpoints", "step_3", "model.safetensors"))
    assert checkpoint and all("lora_" in k for k in checkpoint)  # only the adapters are checkpointed

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(0), output_type="np").images

    base = image()
    pipe.load_lora_weights(out)
    assert not np.array_equal(image(), base)


def test_full_fine_tune_keeps_the_base_models_residual_sampler(tmp_path):
    """A fine-tune of the built-in model exports its residual guidance (0), not the official default."""
    from hart_pipeline.training import train_transformer

    out = str(tmp_path / "finetune")
    train_transformer.main(["--pretrained_model", "default", "--output_dir", out, "--no_text_encoder_export",
                            "--image_size", "64", "--num_samples", "8", "--batch_size", "4", "--num_threads", "1",
                            "--train_steps", "1", "--warmup_steps", "1"])
    assert HARTPipeline.from_pretrained(out).scheduler.config.guidance_scale == 0.0
    assert train_transformer.residual_sampler(SimpleNamespace(pretrained_model=None)).config.guidance_scale is None


def test_bf16_gradient_checkpointing_and_eval_sheets_on_cpu(tmp_path, trained_tokenizer):
    from PIL import Image

    from hart_pipeline.training import train_tokenizer, train_transformer

    extra = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--eval_every", "2", "--eval_samples", "3",
             "--train_steps", "2"]
    tok_out, hart_out = str(tmp_path / "tok"), str(tmp_path / "hart")
    train_tokenizer.main(COMMON + TOKENIZER_ARGS + extra + ["--output_dir", tok_out])
    train_transformer.main(COMMON + TRANSFORMER_ARGS + extra + ["--output_dir", hart_out, "--tokenizer_path",
                                                               trained_tokenizer])
    for out, size in ((tok_out, (3 * 34 + 2, 2 * 34 + 2)), (hart_out, (3 * 34 + 2, 34 + 2))):
        with open(os.path.join(out, "train_log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        assert [entry["step"] for entry in log] == [1, 2] and all(np.isfinite(entry["loss"]) for entry in log)
        sheet = Image.open(os.path.join(out, "samples", "step_2.png"))
        assert sheet.size == size and np.asarray(sheet).std() > 1
    with open(os.path.join(hart_out, "samples", "step_2.json")) as f:
        assert len(json.load(f)) == 3  # the captions of the sheet
    HARTPipeline.from_pretrained(hart_out)


def test_gradient_checkpointing_gives_the_same_gradients():
    tokenizer, transformer, head, tables, context, positions, tokens = _transformer_setup()
    tokenizer.requires_grad_(True)
    images = batch(2)["image"]

    def grads(enable: bool):
        for model in (transformer, head, tokenizer):
            model.zero_grad(set_to_none=True)
            model.enable_gradient_checkpointing() if enable else model.disable_gradient_checkpointing()
        out = losses.transformer_loss(transformer, head, tokenizer, tables, context, positions, tokens.indices,
                                      tokens.residual, cond_drop_prob=0.0, generator=torch.Generator().manual_seed(0))
        (out.loss + losses.tokenizer_loss(tokenizer, images, use_continuous=True).loss).backward()
        return {f"{i}.{n}": p.grad.clone() for i, m in enumerate((transformer, head, tokenizer))
                for n, p in m.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_text_tokenizer_covers_the_captions_and_falls_back_to_sub_words():
    from hart_pipeline.training.text import build_text_tokenizer

    dataset = SyntheticShapesDataset(300, 32, 0)
    tokenizer = build_text_tokenizer(dataset.item(i).caption for i in range(300))
    caption = dataset.item(0).caption
    assert tokenizer.unk_token_id not in tokenizer(caption).input_ids
    assert len(tokenizer.tokenize("red")) == 1  # a caption word is one token
    pieces = tokenizer.tokenize("a zebra-striped circle")  # words never seen: sub-word pieces, no [UNK]
    assert "[UNK]" not in pieces and tokenizer.convert_tokens_to_string(pieces) == "a zebra - striped circle"


def test_new_text_encoder_trains_jointly_resumes_exactly_and_is_exported(tmp_path, trained_tokenizer):
    """--new_text_encoder: a BertModel + WordPiece tokenizer made from the captions, trained with the transformer
    (its weights move), resumed exactly, and saved as the pipeline's text_encoder / tokenizer that load unchanged."""
    from safetensors.torch import load_file

    from hart_pipeline.training import train_transformer

    args = COMMON + TRANSFORMER_ARGS + ["--tokenizer_path", trained_tokenizer, "--new_text_encoder",
                                        "--text_encoder_layers", "1", "--text_encoder_width", "64",
                                        "--checkpoint_every", "2", "--cache_dir", str(tmp_path / "cache")]

    def run(out, steps, resume=None):
        train_transformer.main(args + ["--output_dir", out, "--train_steps", str(steps)]
                               + (["--resume", resume] if resume else []))
        return load_file(os.path.join(out, "text_encoder", "model.safetensors"))

    straight = run(str(tmp_path / "a"), 4)
    init = load_file(os.path.join(tmp_path / "a", "text_encoder_init", "model.safetensors"))
    moved = [k for k in init if not torch.equal(init[k], straight[k])]
    assert "embeddings.word_embeddings.weight" in moved and any("attention" in k for k in moved)
    assert all(torch.equal(init[k], straight[k]) for k in init if k.startswith("pooler."))  # never read: frozen
    run(str(tmp_path / "b"), 2)
    resumed = run(str(tmp_path / "b"), 4, "latest")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    pipe = HARTPipeline.from_pretrained(str(tmp_path / "a"))  # --no_text_encoder_export does not drop a trained one
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.text_encoder.config.hidden_size == 64
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_text_encoder_lr_sets_the_text_encoder_groups_only(trained_tokenizer):
    """--text_encoder_lr: the jointly trained text encoder's AdamW groups get it, the transformer's keep
    --learning_rate; decay stays on matrices only; the group order is fixed (a resumed optimizer state matches);
    a trainable encoder runs without dropout; without --train_text_encoder the option is refused."""
    from hart_pipeline.training import train_transformer
    from hart_pipeline.training.text import load_text_encoder

    _, encoder = load_text_encoder(trainable=True)
    assert all(m.p == 0.0 for m in encoder.modules() if isinstance(m, torch.nn.Dropout))
    args = train_transformer.build_parser().parse_args(
        ["--learning_rate", "5e-4", "--text_encoder_lr", "1e-4", "--train_text_encoder"])
    tokenizer = HARTHybridTokenizer.from_pretrained(trained_tokenizer)
    transformer, head = train_transformer.build_models(args, encoder.config.hidden_size, tokenizer)
    module = train_transformer.TransformerTrainingModule(transformer, head, tokenizer, {}, text_encoder=encoder)
    groups = train_transformer.parameter_groups(module, args)
    ids = [{id(p) for p in g["params"]} for g in groups]
    text_ids = {id(p) for p in encoder.parameters() if p.requires_grad}
    assert [g.get("lr") for g in groups] == [None, None, 1e-4, 1e-4]  # None: the optimizer's --learning_rate
    assert ids[2] | ids[3] == text_ids and not (ids[0] | ids[1]) & text_ids
    assert [g["weight_decay"] for g in groups] == [args.weight_decay, 0.0, args.weight_decay, 0.0]
    assert id(transformer.blocks[0].attn.qkv_proj.weight) in ids[0] and id(transformer.blocks[0].attn.q_bias) in ids[1]
    with pytest.raises(ValueError, match="--text_encoder_lr.*--train_text_encoder"):
        train_transformer.main(["--text_encoder_lr", "1e-4", "--output_dir", "unused"])


def test_train_text_encoder_refuses_lora():
    from hart_pipeline.training import train_transformer

    with pytest.raises(ValueError, match="--train_text_encoder.*--lora_rank|Use one or the other"):
        train_transformer.main(["--pretrained_model", "default", "--lora_rank", "4", "--new_text_encoder",
                                "--output_dir", "unused"])


def test_colour_twins_swap_the_two_colours_in_picture_and_caption():
    from hart_pipeline.training.data import colour_swapped

    assert colour_swapped("an orange circle above a red square", [("circle", "orange", 0.5, 0.25),
                                                                  ("square", "red", 0.5, 0.75)]) == (
        "a red circle above an orange square", [("circle", "red", 0.5, 0.25), ("square", "orange", 0.5, 0.75)])
    assert colour_swapped("two red squares", [("square", "red", 0.3, 0.5), ("square", "red", 0.7, 0.5)]) is None
    dataset = SyntheticShapesDataset(40, 32, seed=6, layout_weights=(0, 1, 0), colour_twins=True)
    plain = SyntheticShapesDataset(40, 32, seed=6, layout_weights=(0, 1, 0))
    for k in range(0, 40, 2):
        base, twin = dataset.item(k), dataset.item(k + 1)
        assert base.caption == plain.item(k).caption  # even items are the plain stream's
        (s1, c1, x1, y1), (s2, c2, x2, y2) = base.attributes
        assert twin.attributes == [(s1, c2, x1, y1), (s2, c1, x2, y2)]
        assert twin.caption != base.caption and sorted(twin.caption.split()) == sorted(base.caption.split())
        # the same pixels wherever neither object is: the background is the base scene's
        same = (base.image == twin.image).all(0)
        assert same.float().mean() > 0.6


def test_colour_twins_share_every_batch(tmp_path, trained_tokenizer, monkeypatch):
    from hart_pipeline.training import train_transformer

    seen = []
    original = train_transformer.split_indices

    def record(flat, patch_nums):
        seen.append(flat)
        return original(flat, patch_nums)

    monkeypatch.setattr(train_transformer, "split_indices", record)
    train_transformer.main(COMMON + TRANSFORMER_ARGS + ["--tokenizer_path", trained_tokenizer, "--colour_twins",
                                                        "--layout_weights", "0", "1", "0", "--train_steps", "3",
                                                        "--output_dir", str(tmp_path / "out")])
    cache = train_transformer.precompute_tokens(
        train_transformer.build_parser().parse_args(COMMON + ["--tokenizer_path", trained_tokenizer, "--colour_twins",
                                                             "--layout_weights", "0", "1", "0"]),
        str(tmp_path / "out" / "cache"), HARTHybridTokenizer.from_pretrained(trained_tokenizer))
    tokens_of = {}
    for i, row in enumerate(cache["indices"]):
        tokens_of.setdefault(tuple(row.tolist()), set()).add(i)
    for batch in seen:  # each batch holds whole pairs (2k, 2k + 1)
        rows = sorted(i for r in batch for i in tokens_of[tuple(r.tolist())])
        pairs = {i // 2 for i in rows}
        assert all({2 * p, 2 * p + 1} <= set(rows) for p in pairs)
    with pytest.raises(ValueError, match="--batch_size must be even"):
        train_transformer.main(["--colour_twins", "--batch_size", "5", "--output_dir", "unused"])


@pytest.mark.parametrize("processes", [1, 2])
def test_time_limit_is_the_main_process_decision_on_every_rank(tmp_path, monkeypatch, processes):
    """With several processes each rank's own clock could stop it a step before the others (which then wait in
    the gradient all-reduce forever); the main process's verdict is broadcast instead."""
    import time

    import accelerate.utils

    from hart_pipeline.training.utils import log_and_checkpoint

    calls = []

    def broadcast(tensor, from_process=0):  # the main process has run out of time; this rank's clock has not
        calls.append(from_process)
        return torch.ones_like(tensor)

    monkeypatch.setattr(accelerate.utils, "broadcast", broadcast)
    accelerator = SimpleNamespace(num_processes=processes, is_main_process=False, device=torch.device("cpu"))
    args = SimpleNamespace(log_every=100, eval_every=0, checkpoint_every=100, max_minutes=60.0, train_steps=10,
                           output_dir=str(tmp_path), keep_checkpoints=2)
    saved = []
    done = log_and_checkpoint(accelerator, args, 3, {}, None, str(tmp_path / "log.jsonl"), time.time(), (),
                              saved.append, None)
    if processes == 1:  # one process: its own clock, no collective
        assert (done, calls, saved) == (False, [], [])
    else:
        assert done and calls == [0] and saved == [os.path.join(str(tmp_path), "checkpoints", "step_3")]
