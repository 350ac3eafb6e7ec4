"""Prometheus metrics (served at GET /metrics, documented in docs/metrics.md).

Two kinds, both in the app's own registry:
- per-request histograms and counters, observed once as each generation request finishes
  (`RequestMetrics.observe`, called from the request's sink);
- gauges and counters of state the server already keeps (engine queue, caches, prompt loads,
  training jobs), read at scrape time by `StateCollector`, so nothing is counted twice.

Requests are labelled by prompt *name* (`math`, never `math-v3` or raw input), or `none` for
the bare model: names exist only once an admin published them, so the label set stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.engine import DoneEvent, FailedEvent, GenerationRequest

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def prompt_label(request: GenerationRequest | None) -> str:
    """The prompt name a request used (prompt keys are (name, version, checksum)), or `none`."""
    return str(request.prompt_key[0]) if request is not None and request.prompt_key else "none"


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry):
        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, ["prompt"], buckets=buckets, registry=registry)

        self.ttft = histogram("softprompt_time_to_first_token_seconds", "From arrival to the first generated token.")
        self.inter_token = histogram(
            "softprompt_inter_token_latency_seconds",
            "Between two consecutive generated tokens of one request.",
            TOKEN_BUCKETS,
        )
        self.e2e = histogram("softprompt_e2e_request_latency_seconds", "From arrival to the last token.")
        self.queue = histogram("softprompt_request_queue_time_seconds", "From arrival to joining the batch.")
        self.prefill = histogram(
            "softprompt_request_prefill_time_seconds", "The prefill the request joined the batch with."
        )
        self.prompt_tokens = Counter(
            "softprompt_prompt_tokens",
            "Prompt positions: template, soft-prompt vectors and input tokens.",
            ["prompt"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "softprompt_generation_tokens", "Generated tokens.", ["prompt"], registry=registry
        )
        self.finished = Counter(
            "softprompt_requests_finished",
            "Finished generation requests by finish reason (stop, length, cancelled, error).",
            ["prompt", "finish_reason"],
            registry=registry,
        )
        # per client key, by its name (never the key): `anonymous` without client keys, `admin`, or
        # `unknown` for a wrong key; names are configured, so the label set stays small
        self.key_requests = Counter(
            "softprompt_key_requests", "Generation requests admitted, by key name.", ["key"], registry=registry
        )
        self.key_refusals = Counter(
            "softprompt_key_refusals",
            "Generation requests refused before routing, by key name and reason (concurrent, requests_per_second, "
            "tokens_per_minute, queue_full, unauthorized).",
            ["key", "reason"],
            registry=registry,
        )
        self.key_tokens = Counter(
            "softprompt_key_generation_tokens", "Generated tokens, by key name.", ["key"], registry=registry
        )

    def count_request(self, key: str, refused: str | None) -> None:
        """One generation request of `key` admitted (`refused` None) or refused, with the reason."""
        if refused is None:
            self.key_requests.labels(key).inc()
        else:
            self.key_refusals.labels(key, refused).inc()

    def observe(self, request: GenerationRequest | None, event: DoneEvent | FailedEvent) -> None:
        """Record one finished request (called once per request, from the engine thread)."""
        prompt = prompt_label(request)
        if isinstance(event, FailedEvent):
            self.finished.labels(prompt, "error").inc()
            return
        self.finished.labels(prompt, event.finish_reason).inc()
        self.prompt_tokens.labels(prompt).inc(event.prompt_tokens)
        self.generation_tokens.labels(prompt).inc(event.completion_tokens)
        if request is not None and request.tenant:
            self.key_tokens.labels(request.tenant).inc(event.completion_tokens)
        if event.finish_reason == "cancelled":
            return  # its latencies say when the client left, not how fast the server was
        self.queue.labels(prompt).observe(event.queue_ms / 1e3)
        self.prefill.labels(prompt).observe(event.prefill_ms / 1e3)
        self.e2e.labels(prompt).observe(event.total_ms / 1e3)
        if event.completion_tokens:
            self.ttft.labels(prompt).observe(event.ttft_ms / 1e3)
        inter_token = self.inter_token.labels(prompt)
        for before, after in zip(event.token_times, event.token_times[1:]):
            inter_token.observe(after - before)


class StateCollector:
    """Reads the server's state at scrape time. `parts` returns the running app's AppState and
    JobManager, or None before the lifespan built them (then there is nothing to report)."""

    def __init__(self, parts: Callable[[], tuple | None]):
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        parts = self.parts()
        if parts is None:
            return
        state, jobs = parts
        yield _counter(
            "softprompt_model_loads", "Times the model was loaded (1 for a healthy server).", state.model_loads
        )
        for kind, metric, what in (
            ("train", "softprompt_training_jobs", "Training jobs by state."),
            ("eval", "softprompt_evaluation_jobs", "Evaluation jobs by state."),
        ):
            by_state = GaugeMetricFamily(metric, what, labels=["state"])
            for job_state, count in sorted(jobs.counts_by_state(kind).items()):
                by_state.add_metric([job_state], count)
            yield by_state
        if state.engine is not None:
            engine = state.engine.stats()
            info = GaugeMetricFamily(
                "softprompt_engine_info",
                "What computes the rows (SOFTPROMPT_ENGINE): 1 for the one running.",
                labels=["backend"],
            )
            info.add_metric([engine["backend"]], 1)
            yield info
            if "kv_cells" in engine:  # llama.cpp: its key/value memory has a fixed size; admission waits for room
                yield _gauge(
                    "softprompt_kv_cells", "Key/value cells of the llama.cpp engine's memory.", engine["kv_cells"]
                )
                yield _gauge(
                    "softprompt_kv_cells_reserved",
                    "Cells reserved by running rows (prompt + max_new_tokens) and cached prefixes.",
                    engine["kv_cells_reserved"],
                )
            yield _gauge("softprompt_requests_running", "Requests in the running batch.", engine["running"])
            yield _gauge("softprompt_requests_waiting", "Requests queued for a batch place.", engine["waiting"])
            cache = engine["prefix_cache"]
            yield _gauge(
                "softprompt_prefix_cache_bytes", "Memory held by cached soft-prompt prefix key/values.", cache["bytes"]
            )
            yield _gauge("softprompt_prefix_cache_entries", "Cached soft-prompt prefixes.", cache["entries"])
            yield _counter(
                "softprompt_prefix_cache_hits", "Requests whose prefix key/values were cached.", cache["hits"]
            )
            yield _counter(
                "softprompt_prefix_cache_misses", "Requests whose prefix had to be computed.", cache["misses"]
            )
            if "input_cache" in engine:
                inputs = engine["input_cache"]
                yield _gauge(
                    "softprompt_input_cache_bytes",
                    "Memory held by cached whole inputs (torch engine).",
                    inputs["bytes"],
                )
                yield _gauge("softprompt_input_cache_entries", "Whole inputs cached.", inputs["entries"])
                yield _counter(
                    "softprompt_input_cache_hits", "Requests whose whole input was cached: no prefill.", inputs["hits"]
                )
                yield _counter(
                    "softprompt_input_cache_misses", "Requests whose input had to be prefilled.", inputs["misses"]
                )
        if state.prompts is not None:
            prompts = state.prompts.stats()
            yield _gauge(
                "softprompt_prompt_versions_loaded", "Prompt versions held in memory (LRU).", prompts["entries"]
            )
            yield _counter(
                "softprompt_prompt_loads", "Prompt versions read and validated from the store.", prompts["loads"]
            )
            yield _counter(
                "softprompt_prompt_load_failures",
                "Prompt loads refused (checksum, shape, incompatible model, unreadable file).",
                prompts["load_failures"],
            )


def served_methods_only(instrumentation: Callable, openapi: Callable[[], dict]) -> Callable:
    """The HTTP metrics' `method` label holds only methods some route serves (those of the app's
    OpenAPI document, with HEAD and OPTIONS, which every path answers); any other method a
    client invents is counted as `other`, so no client can grow /metrics by sending `FOO1`,
    `FOO2`, ... (each would be nine new series)."""
    served: set[str] = set()

    def observe(info) -> None:
        if not served:  # the routes exist once the app is built; read them at the first request
            served.update(
                {"HEAD", "OPTIONS"},
                *({method.upper() for method in operations} for operations in openapi()["paths"].values()),
            )
        if info.method not in served:
            info.method = "other"
        instrumentation(info)

    return observe


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
