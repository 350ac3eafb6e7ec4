"""The in-place row store (server/engine/slots.py) computes what the re-stacked reference computes,
through joins of shorter and longer rows, swap-removals, arbitrary orders and compactions,
sliding-window families included."""

from __future__ import annotations

import random

import pytest
import torch

from core.modeling import from_loaded
from devtools.engine_requests import make_job
from server.engine import slots as slots_module
from server.engine.batch import swap_remove_order
from server.engine.torch_backend import TorchBackend
from tests.families import tiny_family_model

WORDS = "the cat sat on a mat while two dogs ran past seven red houses near the old river bank".split()


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 5, 12, 30])))


@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma3"])
@pytest.mark.parametrize("compact_often", [False, True])
def test_rows_joining_and_leaving_in_place_compute_what_restacking_computes(
    family, compact_often, tokenizer, monkeypatch
):
    if compact_often:  # compaction after every removal
        monkeypatch.setattr(slots_module, "HOLE_COLUMNS", -(10**6))
    compactions = [0]
    compact = slots_module.RowSlots.compact

    def counted(self):
        compactions[0] += 1
        compact(self)

    monkeypatch.setattr(slots_module.RowSlots, "compact", counted)
    frozen = from_loaded(tiny_family_model(family, len(tokenizer)), tokenizer, base_model=family)
    in_place = TorchBackend(frozen, pad_id=0, growing_cache=True)
    restacked = TorchBackend(frozen, pad_id=0, growing_cache=False)
    rng = random.Random(7)
    soft = torch.randn(3, frozen.model.config.hidden_size)
    running: list[int] = []  # the last token of each running row
    compared = 0
    with torch.inference_mode():
        for _ in range(100):
            if not running or rng.random() < 0.3:  # 1-3 new rows, some far longer than the running ones
                jobs = [
                    make_job(tokenizer, _text(rng), soft if rng.random() < 0.5 else None, key=("p", 1, "c"))[0]
                    for _ in range(rng.randint(1, 3))
                ]
                (a_state, a_logits), (b_state, _) = in_place.prefill(jobs), restacked.prefill(jobs)
                in_place.join(a_state, []), restacked.join(b_state, [])
                running += a_logits.argmax(-1).tolist()
            a, b = in_place.decode(running), restacked.decode(running)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            compared += len(running)
            running = a.argmax(-1).tolist()
            if len(running) > 1 and rng.random() < 0.4:
                done = set(rng.sample(range(len(running)), rng.randint(1, len(running) - 1)))
                order = swap_remove_order(len(running), done)
                if rng.random() < 0.3:
                    rng.shuffle(order)  # any order the caller asks for
                in_place.keep(order, []), restacked.keep(order, [])
                running = [running[i] for i in order]
            if len(running) > 6:
                in_place.keep([], []), restacked.keep([], [])
                running = []
    assert compared > 200
    assert compactions[0] > (20 if compact_often else 0)


def test_swap_remove_moves_only_rows_from_the_end_into_holes():
    assert swap_remove_order(5, {1}) == [0, 4, 2, 3]
    assert swap_remove_order(5, {4}) == [0, 1, 2, 3]
    assert swap_remove_order(6, {0, 2, 5}) == [3, 1, 4]
    assert swap_remove_order(3, {0, 1, 2}) == []


def test_the_buffers_are_reused_and_dropped_when_the_batch_empties():
    rows = slots_module.RowSlots()
    kv = [(torch.ones(2, 1, 4, 2), torch.ones(2, 1, 4, 2))]
    rows.join(kv, torch.ones(2, 4, dtype=torch.long))
    buffer = rows.buffers[0][0]
    rows.keep([1])
    rows.join([(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))], torch.ones(1, 3, dtype=torch.long))
    assert rows.buffers[0][0] is buffer  # the join wrote into the room the leaving row left
    assert rows.mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    rows.keep([])
    assert rows.buffers is None and rows.width == 0
