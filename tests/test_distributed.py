"""One training job on several processes (trainer/distributed.py): 2 gloo ranks on CPU train
the same prompt as one process on the same global batches and seed, and under torchrun only
rank 0 publishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from prompt_store import open_store
from tests.jobs_helpers import save_tiny_model
from tests.postgres_cluster import free_port
from trainer.config import TrainConfig
from trainer.data import Example
from trainer.loop import train_prompt
from trainer.modeling import load_frozen_model

WORDS = ["great fun", "a wonderful film", "dull and boring", "a bad movie", "moving", "awful", "witty", "tedious"]
TRAIN = [Example(f"review {i}: {WORDS[i % len(WORDS)]}", "positive" if i % len(WORDS) in (0, 1, 4, 6) else "negative")
         for i in range(22)]  # 22 rows: with batch 6 each epoch ends in a batch of 4
VAL = TRAIN[:4]
CONFIG = dict(init_text="Classify the sentiment.", steps=6, batch_size=6, lr=1e-2, eval_every=3, warmup_steps=1,
              grad_accum=2, seed=3, threads=1)


def _rank(rank: int, world: int, port: int, model: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = train_prompt(load_frozen_model(model, device="cpu"), TRAIN, VAL, TrainConfig(**CONFIG))
        torch.save({"embeddings": result.embeddings, "history": result.history, "metrics": result.metrics},
                   f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


def test_two_gloo_ranks_train_the_same_prompt_as_one_process(model_folder, tmp_path):
    single = train_prompt(load_frozen_model(model_folder, device="cpu"), TRAIN, VAL, TrainConfig(**CONFIG))
    mp.start_processes(_rank, args=(2, free_port(), model_folder, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    main, other = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    init = single.init_embeddings
    assert not torch.allclose(single.embeddings, init), "the prompt did not move: the comparison would be empty"
    torch.testing.assert_close(main["embeddings"], single.embeddings, rtol=1e-4, atol=1e-5)
    # every step's loss is the global batch's, and rank 1 ended with the same vectors it was told to
    losses = [h["loss"] for h in single.history if "loss" in h]
    assert [h["loss"] for h in main["history"] if "loss" in h] == pytest.approx(losses, rel=1e-5)
    assert main["metrics"]["val_after"] == single.metrics["val_after"] and main["metrics"]["best_step"] == single.metrics["best_step"]
    assert other["metrics"] == {"rank": 1}


def test_torchrun_trains_one_prompt_and_only_rank_0_publishes(model_folder, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in TRAIN))
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "trainer", "--data", str(data), "--init", CONFIG["init_text"], "--name", "ddp", "--steps", "3",
         "--batch-size", "4", "--eval-every", "3", "--model", model_folder, "--store", str(store),
         "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("published ddp-v1") == 1
    with open_store(store) as opened:
        assert [str(v.id) for v in opened.versions("ddp")] == ["ddp-v1"]
        assert len(list((tmp_path / "runs").iterdir())) == 1
