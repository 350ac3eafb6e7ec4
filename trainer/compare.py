"""Score several prompts on the same labeled examples and compare them pair by pair.

A *reference* is what gets scored: a published version (`math-v3`, an alias, `math` =
newest), a plain text prompt (its token embeddings in the soft prompt's place, which is what
the model sees when a user types it before the query), or nothing at all (`bare`). Every
reference sees the same examples, so the comparison is paired (trainer/stats.py).

The scoring itself is `evaluate` (label-set scoring for classification, exact match of the
extracted answer for generation); `run_comparison` only takes a `score` function, so the CLI
calls it on its own model and the server runs it in its engine thread on the resident model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

from core.modeling import FrozenModel
from core.untrusted import is_text
from prompt_store import PromptNotFoundError, PromptStore
from trainer.batches import Encoder
from trainer.data import Example
from trainer.evaluate import Task, detect_task, evaluate
from trainer.stats import compare_paired, wilson_interval

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 16
MAX_REFERENCES = 8
MAX_TEXT_CHARS = 2000


class ReferenceError(ValueError):
    """A reference cannot be scored (unknown kind, empty text, too many); the message says which."""


@dataclass(frozen=True)
class ReferenceSpec:
    """What the caller asked for, before anything is loaded: kind "prompt" | "text" | "bare"."""

    kind: str
    value: str = ""

    @property
    def label(self) -> str:
        """Unique per reference: prompt refs are names (no spaces, colons or parentheses)."""
        if self.kind == "prompt":
            return self.value
        if self.kind == "text":
            return f"text: {self.value}"
        return "(bare)"


@dataclass(frozen=True)
class TaskHint:
    """What a prompt's metadata says about the task it was trained for."""

    task: str | None = None
    labels: tuple[str, ...] = ()
    max_new_tokens: int | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> TaskHint:
        config, metrics = meta.get("training_config") or {}, meta.get("metrics") or {}
        task = metrics.get("task") or config.get("task")
        labels = metrics.get("labels") or ()
        max_new = config.get("max_new_tokens")
        return cls(
            task if task in ("classification", "generation") else None,
            tuple(str(label) for label in labels if isinstance(label, str)) if isinstance(labels, list) else (),
            max_new if isinstance(max_new, int) and not isinstance(max_new, bool) and max_new > 0 else None,
        )


@dataclass(frozen=True)
class Reference:
    spec: ReferenceSpec
    vectors: torch.Tensor = field(repr=False)  # [P, D] fp32 cpu; [0, D] for bare
    version: str | None = None  # the resolved name-vN of a prompt reference
    checksum: str | None = None
    hint: TaskHint = field(default_factory=TaskHint)  # what the prompt was trained for, if recorded
    cache_key: tuple | None = None  # content identity for prefix caches (None: no prompt)

    @property
    def label(self) -> str:
        return self.spec.label


def reference_specs(prompts: Sequence[str] = (), texts: Sequence[str] = (), bare: bool = False) -> list[ReferenceSpec]:
    """Specs in the order given (prompts, texts, then bare), without duplicates; validated."""
    specs: list[ReferenceSpec] = []
    for kind, values in (("prompt", prompts), ("text", texts)):
        for value in values:
            if not isinstance(value, str) or not value.strip():
                raise ReferenceError(f"a {kind} reference must be a non-empty string, got {value!r}")
            if not is_text(value):
                raise ReferenceError(f"a {kind} reference is not valid Unicode text (it holds a lone surrogate)")
            if len(value) > MAX_TEXT_CHARS:
                raise ReferenceError(f"a {kind} reference is {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
            specs.append(ReferenceSpec(kind, value))
    if bare:
        specs.append(ReferenceSpec("bare"))
    unique = list(dict.fromkeys(specs))
    if not unique:
        raise ReferenceError("nothing to score: give at least one prompt (e.g. math-v2), text or bare")
    if len(unique) > MAX_REFERENCES:
        raise ReferenceError(f"{len(unique)} references; at most {MAX_REFERENCES} can be compared at once")
    return unique


def load_references(frozen: FrozenModel, store: PromptStore, specs: Sequence[ReferenceSpec]) -> list[Reference]:
    """Resolve and load every reference (store errors pass through: unknown or incompatible prompt)."""
    from trainer.loop import init_embeddings

    references = []
    for spec in specs:
        if spec.kind == "prompt":
            loaded = store.load(spec.value, expect=frozen.fingerprint)
            references.append(
                Reference(
                    spec,
                    loaded.embeddings.float(),
                    str(loaded.version.id),
                    loaded.version.checksum,
                    TaskHint.from_meta(loaded.version.meta),
                    loaded.cache_key,
                )
            )
        elif spec.kind == "text":
            digest = hashlib.sha256(spec.value.encode()).hexdigest()
            references.append(
                Reference(spec, init_embeddings(frozen, spec.value), cache_key=(f"text:{digest[:16]}", 0, digest))
            )
        else:
            references.append(Reference(spec, torch.zeros(0, frozen.embedding.weight.shape[1])))
    return references


def choose_task(hints: Sequence[TaskHint], examples: Sequence[Example], requested: str = "auto") -> Task:
    """The requested task; else the task the first trained prompt was made for; else from the data.

    A classification is scored over the labels the prompts were trained on AND those in the
    data: a test file that happens to hold one class must not make the other unpredictable."""
    if requested == "auto":
        requested = next((h.task for h in hints if h.task), "auto")
    task = detect_task(examples, requested)
    if task.kind == "classification":
        labels = tuple(sorted(set(task.labels).union(*(h.labels for h in hints))))
        if len(labels) < 2 and requested == "auto":  # one answer throughout: compare what is generated
            return Task("generation")
        if len(labels) < 2:
            raise ValueError(f"a classification needs at least 2 labels; the data and prompts give {list(labels)}")
        task = Task("classification", labels)
    return task


def choose_max_new_tokens(hints: Sequence[TaskHint], requested: int | None, *, limit: int = 256) -> int:
    """The requested length; else the first prompt's training setting; else 16. Never above `limit`."""
    if requested is None:
        requested = next((h.max_new_tokens for h in hints if h.max_new_tokens), DEFAULT_MAX_NEW_TOKENS)
    return min(requested, limit)


def data_identity(data: bytes, name: str, examples: int) -> dict:
    """How a result names its data: the file's name, its SHA-256 and the example count."""
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "examples": examples}


ScoreFn = Callable[[Reference, list[Example]], dict]  # evaluate(..., per_example=True) for one chunk


@dataclass
class ComparisonProgress:
    done: int  # (reference, chunk) units scored
    total: int
    elapsed_seconds: float

    @property
    def eta_seconds(self) -> float | None:
        return self.elapsed_seconds / self.done * (self.total - self.done) if self.done else None


class ComparisonCancelled(Exception):
    """`should_stop()` returned True between chunks; nothing is recorded."""


def run_comparison(
    score: ScoreFn,
    references: Sequence[Reference],
    examples: Sequence[Example],
    task: Task,
    *,
    data: dict,
    max_new_tokens: int,
    chunk_size: int = 32,
    on_progress: Callable[[ComparisonProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Score every reference on every example; return the table as JSON (see `comparison_table`)."""
    started = time.perf_counter()
    chunks = [list(examples[i : i + chunk_size]) for i in range(0, len(examples), chunk_size)]
    total, done = len(chunks) * len(references), 0
    if len({r.label for r in references}) != len(references):
        raise ReferenceError("two references have the same label; give each once")
    outcomes = {r.label: [] for r in references}
    predictions = {r.label: [] for r in references}
    for chunk in chunks:  # chunk-major: every reference advances together, so progress is even
        for reference in references:
            if should_stop is not None and should_stop():
                raise ComparisonCancelled(f"evaluation cancelled after {done} of {total} parts")
            result = score(reference, chunk)
            outcomes[reference.label] += result["correct"]
            predictions[reference.label] += result["predictions"]
            done += 1
            if on_progress is not None:
                on_progress(ComparisonProgress(done, total, time.perf_counter() - started))
    return comparison_table(
        references,
        examples,
        task,
        outcomes,
        predictions,
        data=data,
        max_new_tokens=max_new_tokens,
        seconds=time.perf_counter() - started,
    )


def comparison_table(
    references,
    examples,
    task: Task,
    outcomes: dict,
    predictions: dict,
    *,
    data: dict,
    max_new_tokens: int,
    seconds: float,
) -> dict:
    """Accuracy with a 95 % Wilson interval per reference, and McNemar's exact test per pair."""
    n = len(examples)
    metric = "accuracy" if task.kind == "classification" else "exact_match"
    results = []
    for reference in references:
        correct = sum(outcomes[reference.label])
        low, high = wilson_interval(correct, n)
        results.append(
            {
                "reference": reference.label,
                "kind": reference.spec.kind,
                "version": reference.version,
                "checksum": reference.checksum,
                "correct": correct,
                "n": n,
                "score": correct / n if n else 0.0,
                "ci95": [low, high],
            }
        )
    comparisons = []
    for i, a in enumerate(references):
        for b in references[i + 1 :]:
            paired = compare_paired(outcomes[a.label], outcomes[b.label])
            comparisons.append({"a": a.label, "b": b.label, **paired.as_dict()})
    return {
        "task": task.kind,
        "labels": list(task.labels),
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "data": data,
        "seconds": round(seconds, 3),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
        "comparisons": comparisons,
        "examples": [
            {
                "index": k,
                "input": examples[k].input[:200],
                "output": examples[k].output,
                "predicted": {r.label: predictions[r.label][k] for r in references},
                "correct": {r.label: outcomes[r.label][k] for r in references},
            }
            for k in range(n)
        ],
    }


def evaluation_record(table: dict, result: dict, *, source: str) -> dict:
    """What is kept with a version: which data, when, the score (and who measured it)."""
    return {
        "data": table["data"],
        "metric": table["metric"],
        "task": table["task"],
        "score": result["score"],
        "correct": result["correct"],
        "n": result["n"],
        "ci95": result["ci95"],
        "checksum": result["checksum"],
        "max_new_tokens": table["max_new_tokens"],
        "at": table["finished_at"],
        "source": source,
    }


def record_results(store: PromptStore, table: dict, *, source: str) -> list[str]:
    """Keep each scored version's result with it; returns the versions recorded (a version
    deleted while it was being scored is skipped)."""
    recorded = []
    for result in table["results"]:
        if result["kind"] == "prompt" and result["version"]:
            try:
                store.record_evaluation(result["version"], evaluation_record(table, result, source=source))
            except PromptNotFoundError:
                logger.warning("%s was deleted while it was scored; its result is not recorded", result["version"])
                continue
            recorded.append(result["version"])
    return recorded


def format_table(table: dict) -> str:
    """The comparison as plain text: one line per reference, then one per pair."""
    data = table["data"]
    lines = [
        f"{data['name']} ({data['examples']} examples, sha256 {data['sha256'][:12]}), {table['task']}: "
        f"{table['metric']}",
        "",
    ]
    width = max(len("reference"), *(len(r["reference"][:48]) for r in table["results"]))
    lines.append(f"{'reference':<{width}}  {'score':>7}  {'95 % interval':>15}  {'correct':>9}")
    for r in table["results"]:
        low, high = r["ci95"]
        lines.append(
            f"{r['reference'][:48]:<{width}}  {100 * r['score']:6.1f}%  [{100 * low:5.1f}, {100 * high:5.1f}]  "
            f"{r['correct']:>4}/{r['n']:<4}"
        )
    if table["comparisons"]:
        lines += ["", "paired (McNemar's exact test on the examples where the two disagree):"]
        for c in table["comparisons"]:
            lines.append(
                f"  {c['a'][:40]} vs {c['b'][:40]}: {100 * c['difference']:+.1f} points "
                f"({c['only_a']} only A, {c['only_b']} only B), p = {_p(c['p_value'])}"
            )
    return "\n".join(lines)


def _p(value: float) -> str:
    return "1" if value >= 0.9995 else f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def model_scorer(
    frozen: FrozenModel, encoder: Encoder, task: Task, *, max_new_tokens: int, batch_size: int = 16
) -> ScoreFn:
    """Score a chunk with `evaluate` on `frozen` (the caller decides which thread runs it)."""

    def score(reference: Reference, chunk: list[Example]) -> dict:
        return evaluate(
            frozen,
            encoder,
            reference.vectors,
            chunk,
            task,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            per_example=True,
        )

    return score
