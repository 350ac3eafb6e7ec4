"""One tenant cannot starve another (issue 27): the waiting queue is served key by key, a flood
fills only its own share of the queue, per-key limits answer 429 with Retry-After and reset on
time, metrics count by key name, and no key ever shows in metrics, logs or errors."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

import pytest

from server.engine import QueueFullError
from server.engine.scheduler import DEMAND_MEMORY_S, FLOOD_RIDE_S, START_MEMORY_S, Scheduler
from server.services.tenants import FLOOD_HOLD_S, RateLimitedError, Tenants
from tests.engine_helpers import make_job
from tests.http_helpers import app_client, mixing  # noqa: F401
from tests.test_metrics import moved, scrape

KEYS = "alice=sk-alice-secret,bob=sk-bob-secret"
ALICE, BOB = {"Authorization": "Bearer sk-alice-secret"}, {"Authorization": "Bearer sk-bob-secret"}


def _requests(tokenizer, tenant: str, count: int):
    jobs = []
    for i in range(count):
        job, _ = make_job(tokenizer, f"{tenant} {i}")
        job.tenant, job.holds_queue_place = tenant, True
        jobs.append(job)
    return jobs


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("fair", ["a0", "b0", "a1", "b1", "a2", "a3"]),
        ("fifo", ["a0", "a1", "a2", "a3", "a4", "b0"]),
    ],
)
def test_waiting_requests_are_admitted_key_by_key(tokenizer, policy, expected):
    scheduler = Scheduler(max_queue=64, retry_after=1, policy=policy)
    names = {}
    for tenant, count in (("a", 5), ("b", 2)):  # all of a's arrive first
        for i, job in enumerate(_requests(tokenizer, tenant, count)):
            names[id(job)] = f"{tenant}{i}"
            scheduler.places += 1
            scheduler.held[tenant] += 1
            scheduler.waiting.append(job)
    admitted = scheduler.admit(4) + scheduler.admit(2)
    assert [names[id(job)] for job in admitted] == expected
    assert scheduler.places == 1 and len(scheduler.waiting) == 1


def _waiting(tokenizer, scheduler, counts: dict[str, int]) -> None:
    for tenant, count in counts.items():
        for job in _requests(tokenizer, tenant, count):
            scheduler.places += 1
            scheduler.held[tenant] += 1
            scheduler.waiting.append(job)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_holds_at_most_its_share_of_the_batch_rows_while_another_key_is_active(tokenizer):
    clock = Clock()
    scheduler = Scheduler(max_queue=64, retry_after=1, clock=clock)
    _waiting(tokenizer, scheduler, {"flood": 9, "polite": 3})
    # 8 rows, flood holds 6: two keys active, a share is 4 rows; only polite joins
    admitted = scheduler.admit(2, Counter(flood=6))
    assert [job.tenant for job in admitted] == ["polite", "polite"]
    # polite holds 2 and waits with 1 more (asks for 3); flood holds 2: flood goes up to 3, polite to its 3
    admitted = scheduler.admit(4, Counter(flood=2, polite=2))
    assert sorted(job.tenant for job in admitted) == ["flood", "polite"]
    # polite has nothing waiting but still runs 3 rows: flood stops at 3, the free rows stay free
    admitted = scheduler.admit(2, Counter(flood=3, polite=3))
    assert admitted == []
    # polite is gone (longer than its demand is remembered): flood may take every free row
    clock.now += DEMAND_MEMORY_S + 0.1
    admitted = scheduler.admit(5, Counter(flood=3))
    assert [job.tenant for job in admitted] == ["flood"] * 5
    assert len(scheduler.waiting) == 3 and scheduler.places == 3


def test_beside_a_small_key_a_flood_runs_no_more_rows_than_that_key_asks_for(tokenizer):
    """16 rows, a polite key running 4: the flood gets 4 of them (not half the batch), so the
    polite key's steps are not slowed by 12 flood rows and their prefills."""
    scheduler = Scheduler(max_queue=64, retry_after=1)
    _waiting(tokenizer, scheduler, {"flood": 20})
    admitted = scheduler.admit(12, Counter(polite=4))
    assert [job.tenant for job in admitted] == ["flood"] * 4
    _waiting(tokenizer, scheduler, {"polite": 2})  # polite asks for 6 now: the flood may follow to 6
    admitted = scheduler.admit(8, Counter(polite=4, flood=4))
    assert sorted(job.tenant for job in admitted) == ["flood", "flood", "polite", "polite"]


def test_between_a_keys_answer_and_its_next_request_the_flood_does_not_take_its_rows(tokenizer):
    """A polite client holds nothing from its answer until its next request arrives; for a while
    its key's demand is remembered, so the flood waiting in that gap stays at 4 rows."""
    clock = Clock()
    scheduler = Scheduler(max_queue=64, retry_after=1, clock=clock)
    _waiting(tokenizer, scheduler, {"flood": 20})
    assert len(scheduler.admit(8, Counter(polite=4, flood=4))) == 0  # flood at polite's 4
    clock.now += DEMAND_MEMORY_S / 2
    assert scheduler.admit(12, Counter(flood=4)) == []  # polite's 4 just finished: still 4
    clock.now += DEMAND_MEMORY_S
    assert len(scheduler.admit(12, Counter(flood=4))) == 12  # polite did not come back: all rows


def test_fifo_and_a_single_key_fill_every_free_row(tokenizer):
    fifo = Scheduler(max_queue=64, retry_after=1, policy="fifo")
    _waiting(tokenizer, fifo, {"flood": 4, "polite": 1})
    assert len(fifo.admit(4, Counter(flood=4, polite=1))) == 4
    one_key = Scheduler(max_queue=64, retry_after=1)
    _waiting(tokenizer, one_key, {"anonymous": 6})
    assert len(one_key.admit(6, Counter(anonymous=10))) == 6


def test_refusals_past_the_burst_are_answered_slower_the_longer_a_key_keeps_on():
    tenants = Tenants({"flood": "k"}, None, {})
    second, base = 1000.0, 0.25

    def delays(at: float, count: int) -> list[float]:
        return [tenants.refusal_delay("flood", 2, base, now=at) for _ in range(count)]

    assert delays(second, 4) == [0, 0, base, base]  # two at once, then the base delay
    assert delays(second + 1, 3) == [0, 0, 2 * base]  # the next second over the burst: doubled
    assert delays(second + 2, 3)[-1] == 4 * base
    assert delays(second + 3, 3)[-1] == 8 * base
    assert delays(second + 4, 3)[-1] == 8 * base  # at most 8 times
    assert delays(second + 5, 2) == [0, 0]  # a second within the burst ...
    assert delays(second + 6, 3)[-1] == base  # ... starts over
    assert delays(second + 9, 3)[-1] == base  # so does a pause
    assert tenants.refusal_delay("nobody", 0, base, now=second) == 0


def test_a_key_refused_over_its_burst_counts_as_flooding_while_it_keeps_on():
    tenants = Tenants({"flood": "k", "polite": "p"}, None, {})
    second = 1000.0
    for _ in range(3):
        tenants.refusal_delay("flood", 2, 0.1, now=second)
    assert tenants.flooding("flood", now=second) and not tenants.flooding("polite", now=second)
    assert tenants.flooding("flood", now=second + FLOOD_HOLD_S - 0.01)  # held: no flicker between seconds
    assert not tenants.flooding("flood", now=second + FLOOD_HOLD_S)  # it stopped
    tenants.refusal_delay("polite", 2, 0.1, now=second + 2)
    tenants.refusal_delay("polite", 2, 0.1, now=second + 2)
    assert not tenants.flooding("polite", now=second + 2)  # refused within its burst
    assert not tenants.flooding("nobody", now=second)


def test_a_flooding_key_runs_a_quarter_of_the_rows_the_other_key_asks_for(tokenizer):
    """Beside a polite key running 8 rows, a key that retries refused requests at once runs 2; alone
    (or once it stops flooding) it may take the rows as before."""
    flooding = {"flood"}
    clock = Clock()
    scheduler = Scheduler(max_queue=64, retry_after=1, clock=clock, flooding=flooding.__contains__, flood_rows=0.25)
    _waiting(tokenizer, scheduler, {"polite": 8})
    assert len(scheduler.admit(8, Counter())) == 8  # the polite key started its 8
    _waiting(tokenizer, scheduler, {"flood": 20})
    assert [job.tenant for job in scheduler.admit(8, Counter(polite=8))] == ["flood"] * 2
    assert scheduler.admit(6, Counter(polite=8, flood=2)) == []
    flooding.clear()  # it backs off now: the polite key's 8, as any other key
    assert len(scheduler.admit(6, Counter(polite=8, flood=2))) == 6
    flooding.add("flood")
    clock.now += DEMAND_MEMORY_S + 0.1  # the polite key is gone: the flood may fill the batch
    assert len(scheduler.admit(8, Counter(flood=8))) == 8


def test_beside_another_key_a_flooding_key_starts_in_the_other_keys_prefill_passes(tokenizer):
    """Each prefill pass stalls every running row: beside a polite key, a flood's requests join the
    passes the polite key's requests start, and start a pass of their own at most once in
    FLOOD_RIDE_S; alone the flood starts whenever rows are free."""
    clock = Clock()
    scheduler = Scheduler(max_queue=64, retry_after=1, clock=clock, flooding={"flood"}.__contains__, flood_rows=0.25)
    _waiting(tokenizer, scheduler, {"polite": 8})
    assert len(scheduler.admit(8, Counter())) == 8
    scheduler.starts["polite"] = 100  # the polite key has started many: the flood's share of starts is not the bound
    _waiting(tokenizer, scheduler, {"flood": 20})
    # the polite key runs 8 rows: the flood's share is 2
    assert [job.tenant for job in scheduler.admit(8, Counter(polite=8))] == ["flood"] * 2  # a pass of its own
    clock.now += FLOOD_RIDE_S / 2
    assert scheduler.admit(7, Counter(polite=8, flood=1)) == []  # not another one yet: the polite rows run on
    _waiting(tokenizer, scheduler, {"polite": 1})
    assert sorted(job.tenant for job in scheduler.admit(8, Counter(polite=7, flood=1))) == ["flood", "polite"]
    assert scheduler.admit(7, Counter(polite=8, flood=1)) == []
    clock.now += FLOOD_RIDE_S / 2
    assert [job.tenant for job in scheduler.admit(7, Counter(polite=8, flood=1))] == ["flood"]
    clock.now += DEMAND_MEMORY_S + 0.1  # the polite key is gone: nobody's rows to stall, no wait
    assert len(scheduler.admit(10, Counter(flood=2))) == 10
    assert len(scheduler.admit(4, Counter(flood=12))) == 4


def test_beside_another_key_a_flooding_key_starts_an_eighth_of_the_requests_it_starts(tokenizer):
    """Rows alone leave a flood one row beside a small key, a fifth of the work beside a key running 4;
    a flooding key also starts at most flood_rows (1/8) of the requests the most active other key
    starts, plus one, counted over START_MEMORY_S: beside a key starting 40 requests, 6."""
    clock = Clock()
    scheduler = Scheduler(max_queue=256, retry_after=1, clock=clock, flooding={"flood"}.__contains__)
    _waiting(tokenizer, scheduler, {"flood": 100})
    started = Counter()
    for _ in range(40):  # the polite key runs 4 rows, one request starting every 50 ms
        _waiting(tokenizer, scheduler, {"polite": 1})
        for job in scheduler.admit(12, Counter(polite=3)):  # the flood's row is free each time
            started[job.tenant] += 1
        clock.now += 0.05
    assert started["polite"] == 40
    assert 4 <= started["flood"] <= 7  # an eighth of 40, one more, and its own starts age too (rows alone: 40)
    clock.now += 3 * START_MEMORY_S + DEMAND_MEMORY_S  # alone: as many as rows are free
    assert len(scheduler.admit(16, Counter())) == 16


def test_a_full_queue_still_has_a_place_for_a_key_under_its_share():
    scheduler = Scheduler(max_queue=4, retry_after=1)
    scheduler.reserve(4, alive=True, tenant="flood")
    with pytest.raises(QueueFullError):
        scheduler.reserve(1, alive=True, tenant="flood")
    scheduler.reserve(1, alive=True, tenant="polite")  # 2 keys: a share is 2 places each
    scheduler.reserve(1, alive=True, tenant="polite")
    with pytest.raises(QueueFullError):
        scheduler.reserve(1, alive=True, tenant="polite")
    scheduler.release(3, "flood")  # the flood's requests leave the queue: room for anyone again
    assert scheduler.places == 3 and not scheduler.refuses("flood") and not scheduler.refuses("polite")
    scheduler.reserve(1, alive=True, tenant="flood")  # full again: each key holds its share of 2
    assert scheduler.refuses("flood") and scheduler.refuses("polite") and scheduler.refuses("newcomer", 3)
    assert not scheduler.refuses("newcomer")  # 3 keys: a share is 2, the newcomer holds none


def test_token_buckets_refuse_with_the_wait_and_refill_on_time():
    tenants = Tenants({"alice": "k"}, None, {"alice": {"requests_per_second": 2, "tokens_per_minute": 60}})
    start = 1000.0
    tenants.acquire("alice", now=start)
    tenants.acquire("alice", now=start)
    with pytest.raises(RateLimitedError) as refused:
        tenants.acquire("alice", now=start)
    assert refused.value.limit == "requests_per_second" and refused.value.retry_after == 1
    tenants.acquire("alice", now=start + 0.5)  # half a second: one more request
    tenants.charge("alice", 90, now=start + 0.5)  # 90 tokens from a minute's 60: 30 in debt
    with pytest.raises(RateLimitedError) as refused:
        tenants.acquire("alice", now=start + 2)
    assert refused.value.limit == "tokens_per_minute" and refused.value.retry_after == 29  # 28.5 s to be out of debt
    tenants.acquire("alice", now=start + 32)


def test_limits_answer_429_with_retry_after_before_routing_and_reset_on_time(app_client):
    limits = {"alice": {"requests_per_second": 2}}
    with app_client(client_keys=KEYS, key_limits=json.dumps(limits)) as client:
        ok = [client.post("/generate", json={"input": "hi", "max_new_tokens": 1}, headers=ALICE) for _ in range(2)]
        refused = client.post(
            "/generate", content=b"not even json", headers={**ALICE, "content-type": "application/json"}
        )
        bob = client.post("/generate", json={"input": "hi", "max_new_tokens": 1}, headers=BOB)
        v1 = client.post(
            "/v1/completions", json={"model": "tiny-untied", "prompt": "hi", "max_tokens": 1}, headers=ALICE
        )
        time.sleep(1.1)
        again = client.post("/generate", json={"input": "hi", "max_new_tokens": 1}, headers=ALICE)
    assert [a.status_code for a in ok] == [200, 200] and bob.status_code == 200 and again.status_code == 200
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"  # refused before the body was read
    error = refused.json()["error"]
    assert (
        error["code"] == "rate_limited"
        and error["key_name"] == "alice"
        and error["limit_name"] == "requests_per_second"
    )
    assert v1.status_code == 429 and v1.json()["error"]["type"] == "rate_limit_error"


def test_a_key_at_its_concurrency_limit_waits_while_another_is_served(app_client):
    limits = {"default": {"concurrent": 1}}
    with app_client(client_keys=KEYS, key_limits=json.dumps(limits)) as client:
        engine = client.app.state.softprompt.engine
        engine.pause()
        first = {}
        thread = threading.Thread(
            target=lambda: first.update(
                answer=client.post("/generate", json={"input": "hi", "max_new_tokens": 2}, headers=ALICE)
            )
        )
        thread.start()
        while engine.stats()["waiting"] < 1:
            time.sleep(0.01)
        second = client.post("/generate", json={"input": "hi", "max_new_tokens": 2}, headers=ALICE)
        engine.resume()
        bob = client.post("/generate", json={"input": "hi", "max_new_tokens": 2}, headers=BOB)
        thread.join(30)
        after = client.post("/generate", json={"input": "hi", "max_new_tokens": 2}, headers=ALICE)
    assert second.status_code == 429 and second.json()["error"]["limit_name"] == "concurrent"
    assert first["answer"].status_code == 200 and bob.status_code == 200 and after.status_code == 200


def test_metrics_count_by_key_name_and_no_key_shows_anywhere(app_client, caplog):
    caplog.set_level(logging.INFO)
    with app_client(client_keys=KEYS, key_limits=json.dumps({"bob": {"requests_per_second": 1}})) as client:
        before = scrape(client)
        for _ in range(3):
            client.post("/generate", json={"input": "hi", "max_new_tokens": 3, "ignore_eos": True}, headers=ALICE)
        answers = [client.post("/generate", json={"input": "hi", "max_new_tokens": 2}, headers=BOB) for _ in range(2)]
        wrong = client.post("/generate", json={"input": "hi"}, headers={"Authorization": "Bearer sk-not-a-key"})
        after = scrape(client)
        text = client.get("/metrics").text
    assert moved(before, after, "softprompt_key_requests_total", key="alice") == 3
    assert moved(before, after, "softprompt_key_generation_tokens_total", key="alice") == 9
    assert moved(before, after, "softprompt_key_requests_total", key="bob") == 1
    assert moved(before, after, "softprompt_key_refusals_total", key="bob", reason="requests_per_second") == 1
    assert moved(before, after, "softprompt_key_refusals_total", key="unknown", reason="unauthorized") == 1
    assert wrong.status_code == 401 and [a.status_code for a in answers] == [200, 429]
    bodies = text + "".join(a.text for a in answers) + wrong.text + caplog.text
    assert "key=alice" in caplog.text
    for secret in ("sk-alice-secret", "sk-bob-secret", "sk-not-a-key"):
        assert secret not in bodies
