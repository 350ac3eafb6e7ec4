"""One training job on several processes (trainer/distributed.py): 2 gloo ranks on CPU train
the same prompt as one process on the same global batches and seed, and under torchrun only
rank 0 publishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from core.modeling import load_frozen_model
from devtools.postgres import free_port
from prompt_store import open_store
from tests.jobs_helpers import save_tiny_model
from trainer.config import TrainConfig
from trainer.data import Example
from trainer.loop import TrainingCancelled, train_prompt

pytestmark = pytest.mark.processes

WORDS = ["great fun", "a wonderful film", "dull and boring", "a bad movie", "moving", "awful", "witty", "tedious"]
TRAIN = [
    Example(f"review {i}: {WORDS[i % len(WORDS)]}", "positive" if i % len(WORDS) in (0, 1, 4, 6) else "negative")
    for i in range(22)
]  # 22 rows: with batch 6 each epoch ends in a batch of 4
VAL = TRAIN[:4]
CONFIG = dict(
    init_text="Classify the sentiment.",
    steps=6,
    batch_size=6,
    lr=1e-2,
    eval_every=3,
    warmup_steps=1,
    grad_accum=2,
    seed=3,
    threads=1,
)
# 3 ranks on batches of 4 (an epoch's last batch of 2 leaves a rank nothing), an lr and a clip
# small enough that clipping and the trust-region projection act on every step, early stopping.
HARD = dict(CONFIG, steps=12, batch_size=4, lr=0.5, max_grad_norm=1e-3, min_cosine=0.99, eval_every=1, patience=2)


def _rank(rank: int, world: int, port: int, model: str, out: str, config: dict, cancel_at: int | None) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )  # a mismatched collective fails, not hangs
    steps = iter(range(1, 10_000))
    should_stop = (lambda: next(steps) >= cancel_at) if cancel_at else None  # called once a step, on rank 0
    try:
        result = train_prompt(
            load_frozen_model(model, device="cpu"), TRAIN, VAL, TrainConfig(**config), should_stop=should_stop
        )
        torch.save(
            {
                "embeddings": result.embeddings,
                "final": result.final_embeddings,
                "history": result.history,
                "metrics": result.metrics,
            },
            f"{out}/rank{rank}.pt",
        )
    except TrainingCancelled:
        torch.save({"cancelled": True}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _spawn(world: int, model: str, out: Path, config: dict, cancel_at: int | None = None) -> list[dict]:
    mp.start_processes(
        _rank,
        args=(world, free_port(), model, str(out), config, cancel_at),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


@pytest.mark.parametrize(
    "world, config", [(2, CONFIG), (3, HARD)], ids=["2-ranks", "3-ranks-clipped-projected-early-stop"]
)
def test_ranks_train_the_same_prompt_as_one_process(model_folder, tmp_path, world, config):
    single = train_prompt(load_frozen_model(model_folder, device="cpu"), TRAIN, VAL, TrainConfig(**config))
    main, *others = _spawn(world, model_folder, tmp_path, config)
    assert not torch.allclose(single.embeddings, single.init_embeddings), "the prompt did not move: nothing to compare"
    torch.testing.assert_close(main["embeddings"], single.embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(main["final"], single.final_embeddings, rtol=1e-4, atol=1e-5)
    losses = [h["loss"] for h in single.history if "loss" in h]  # every step's loss is the global batch's
    assert [h["loss"] for h in main["history"] if "loss" in h] == pytest.approx(losses, rel=1e-5)
    assert (
        main["metrics"]["val_after"] == single.metrics["val_after"]
        and main["metrics"]["best_step"] == single.metrics["best_step"]
    )
    assert main["metrics"]["steps_run"] == single.metrics["steps_run"]
    for rank, other in enumerate(others, start=1):  # every rank took the same steps to the same vectors
        assert other["metrics"] == {"rank": rank} and torch.equal(other["final"], main["final"])
    if config is HARD:
        rows = [h for h in single.history if "loss" in h]
        assert all(h["projected_rows"] > 0 for h in rows) and all(h["grad_norm"] > 1e-3 for h in rows)
        assert single.metrics["stopped_early"] and single.metrics["steps_run"] < config["steps"]


def test_a_cancel_on_rank_0_stops_every_rank(model_folder, tmp_path):
    assert all(r.get("cancelled") for r in _spawn(2, model_folder, tmp_path, CONFIG, cancel_at=3))


def test_torchrun_trains_one_prompt_and_only_rank_0_publishes(model_folder, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in TRAIN))
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "trainer",
            "--data",
            str(data),
            "--init",
            CONFIG["init_text"],
            "--name",
            "ddp",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--eval-every",
            "3",
            "--model",
            model_folder,
            "--store",
            str(store),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("published ddp-v1") == 1
    with open_store(store) as opened:
        assert [str(v.id) for v in opened.versions("ddp")] == ["ddp-v1"]
        assert len(list((tmp_path / "runs").iterdir())) == 1
