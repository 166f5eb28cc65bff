"""Several processes (accelerate launch, 2 CPU processes over gloo): training stays in sync and resumes,
distributed generation writes what one process writes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hart_pipeline import HARTPipeline

from conftest import tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(module_args, cwd, processes: int = 2) -> str:
    """``accelerate launch`` of ``python -m ...`` with CPU processes (gloo); returns the output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", *module_args]
    with open(os.path.join(cwd, "launch.log"), "w") as log:  # a file, not a pipe: nothing can block on output
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode
    with open(os.path.join(cwd, "launch.log")) as log:
        output = log.read()
    assert code == 0, output[-5000:]
    return output


def test_two_process_training_stays_in_sync_resumes_and_loads(tmp_path):
    from hart_pipeline.training import train_tokenizer

    tok_dir, hart_dir = str(tmp_path / "tokenizer"), str(tmp_path / "hart")
    train_tokenizer.main(["--image_size", "32", "--num_samples", "16", "--batch_size", "4", "--num_threads", "1",
                          "--output_dir", tok_dir, "--train_steps", "1", "--latent_channels", "8", "--vocab_size", "64",
                          "--base_channels", "32", "--patch_nums", "1", "2", "3", "4"])
    args = ["hart_pipeline.training.train_transformer", "--image_size", "32", "--num_samples", "16", "--batch_size",
            "2", "--num_threads", "1", "--checkpoint_every", "2", "--log_every", "1", "--output_dir", hart_dir,
            "--tokenizer_path", os.path.join(tok_dir, "vae"), "--embed_dim", "64", "--num_layers", "1", "--num_heads",
            "2", "--context_tokens", "8", "--head_width", "32", "--head_layers", "1", "--no_text_encoder_export"]
    launch(args + ["--train_steps", "2"], tmp_path)
    checkpoint = os.path.join(hart_dir, "checkpoints", "step_2")
    assert {"optimizer_0.safetensors", "optimizer_1.safetensors", "rng_0.safetensors", "rng_1.safetensors"} <= set(
        os.listdir(checkpoint))
    output = launch(args + ["--train_steps", "3", "--resume", "latest"], tmp_path)
    assert "resumed from" in output and "at step 2" in output
    with open(os.path.join(hart_dir, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 3 and summary["num_processes"] == 2
    a, b = summary["rank_parameter_checksums"]
    assert a == b  # both ranks hold the same weights after every update
    from hart_pipeline.training.text import load_text_encoder

    text_tokenizer, text_encoder = load_text_encoder()
    pipe = HARTPipeline.from_pretrained(hart_dir, tokenizer=text_tokenizer, text_encoder=text_encoder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_distributed_generation_matches_one_process(tmp_path):
    from hart_pipeline import cli

    model = str(tmp_path / "model")
    tiny_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle above a red circle\ntwo lemurs\nthe hat\n")
    common = ["generate", "--model", model, "--prompts", str(prompts), "--steps", "2", "--seed", "3", "--dtype", "fp32"]
    cli.main(common + ["--out-dir", str(tmp_path / "one"), "--device", "cpu"])
    launch(["hart_pipeline.cli"] + common + ["--out-dir", str(tmp_path / "two")], tmp_path)
    one = sorted(f for f in os.listdir(tmp_path / "one") if f.endswith(".png"))
    assert one == [f"{i:05d}.png" for i in range(5)] == sorted(f for f in os.listdir(tmp_path / "two") if f.endswith(".png"))
    images = [np.asarray(Image.open(tmp_path / "one" / f)) for f in one]
    for f, image in zip(one, images):
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / "two" / f))), f
    assert not np.array_equal(images[0], images[1])
    with open(tmp_path / "two" / "prompts.json") as f:
        assert json.load(f)[1] == {"file": "00001.png", "prompt": "a blue square", "seed": 4}
    # image i is the pipeline's output for prompt i with seed + i
    pipe = HARTPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(4)).images[0]
    assert np.array_equal(np.asarray(expected), images[1])


def test_prompt_file_errors(tmp_path):
    from hart_pipeline.distributed import read_prompts

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(str(empty))
