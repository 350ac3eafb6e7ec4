"""The family matrix (issue 23): every common decoder family, sliding-window and mixed
sliding/full ones included, is served exactly like plain transformers by the batching engine
with the server's rewrites on, and trains and exports like the default model.

For each family (tests/families.py): bare greedy output == `generate`; a soft prompt made of a
text's token embeddings == that text (prefix cache on and off); mixed concurrent requests ==
the same requests one by one; one training step, a publish, and a PEFT export that PEFT loads
and that computes our logits."""

from __future__ import annotations

import copy

import pytest
import torch

from core.layout import ChatLayout
from core.modeling import from_loaded
from core.prepend import prepend_soft_prompt
from prompt_store import open_store
from server.engine import Engine
from server.engine.rewrites import prepare_for_serving
from tests.engine_helpers import make_job, wait_all
from tests.families import FAMILIES, SLIDING, WINDOW, tiny_family_model
from tests.jobs_helpers import SENTIMENT
from trainer.config import TrainConfig
from trainer.data import parse_examples
from trainer.loop import train_prompt
from trainer.publish import publish_result

NEW_TOKENS = 14
QUESTIONS = ["Classify", "What is two plus three?", "a bad movie"]
INSTRUCTION = "Please reason step by step"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tokenizer):
    """(name, the model rewritten for serving as the server does, an untouched copy for reference)."""
    model = tiny_family_model(request.param, len(tokenizer))
    plain = copy.deepcopy(model)
    frozen = from_loaded(model, tokenizer, base_model=f"tiny-{request.param}")
    prepare_for_serving(frozen.model, max_batch_size=8)
    return request.param, frozen, from_loaded(plain, tokenizer, base_model=f"tiny-{request.param}")


def reference_tokens(plain, tokenizer, question: str, instruction_ids: list[int] = ()) -> list[int]:
    """Plain transformers: greedy `generate` over the chat template, the instruction as tokens
    where the engine puts the soft prompt (after the template head, before the question)."""
    layout = ChatLayout(tokenizer).for_input(question)
    ids = torch.tensor([list(layout.head_ids) + list(instruction_ids) + list(layout.tail_ids)])
    with torch.no_grad():
        out = plain.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    stop = tokenizer.eos_token_id
    return new[: new.index(stop) + 1] if stop in new else new  # up to its end of turn, as the engine reports it


def served(frozen, jobs: list[tuple], *, together: bool, use_prefix_cache: bool = True) -> list[list[int]]:
    """Greedy tokens of (question, soft, key) requests on a fresh engine: all admitted in one batch, or one by one."""
    engine = Engine(frozen, max_batch_size=8, use_prefix_cache=use_prefix_cache)
    engine.start()
    try:
        made = [make_job(frozen.tokenizer, q, soft, key=key, max_new_tokens=NEW_TOKENS) for q, soft, key in jobs]
        if together:
            engine.pause()
            for job, _ in made:
                engine.submit(job)
            engine.resume()
            return [done.token_ids for done, _ in wait_all([sink for _, sink in made])]
        out = []
        for job, sink in made:
            engine.submit(job)
            out.append(sink.result()[0].token_ids)
        return out
    finally:
        engine.stop()


def test_every_family_starts_and_the_sliding_ones_run_past_their_window(family, tokenizer):
    name, frozen, _ = family
    layout = ChatLayout(tokenizer).for_input(QUESTIONS[0])
    assert (name in SLIDING) == bool(getattr(frozen.model.config, "sliding_window", None))
    assert len(layout.head_ids) + len(layout.tail_ids) + NEW_TOKENS > 3 * WINDOW


def test_bare_greedy_output_equals_transformers_generate(family, tokenizer):
    name, frozen, plain = family
    expected = [reference_tokens(plain, tokenizer, q) for q in QUESTIONS]
    assert served(frozen, [(q, None, None) for q in QUESTIONS], together=False) == expected, name
    assert len({tuple(e) for e in expected}) > 1  # the inputs really lead to different outputs


@pytest.mark.parametrize("use_prefix_cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_a_soft_prompt_of_a_texts_embeddings_equals_that_text(family, tokenizer, use_prefix_cache):
    name, frozen, plain = family
    ids = tokenizer(INSTRUCTION, add_special_tokens=False).input_ids
    with torch.no_grad():
        soft = frozen.token_embeddings(ids).float()  # [P, D], what the model reads for the text (Gemma scales it)
    got = served(
        frozen,
        [(q, soft, ("instruction", 1, "x")) for q in QUESTIONS[:2]],
        together=True,
        use_prefix_cache=use_prefix_cache,
    )
    assert got == [reference_tokens(plain, tokenizer, q, ids) for q in QUESTIONS[:2]], name


def test_concurrent_mixed_requests_equal_the_same_requests_one_by_one(family, tokenizer):
    name, frozen, _ = family
    torch.manual_seed(7)
    width = frozen.fingerprint.hidden_size
    softs = [torch.randn(3, width), torch.randn(9, width), None, torch.randn(5, width)]
    jobs = [
        (QUESTIONS[i % len(QUESTIONS)], soft, None if soft is None else ("p", i, "c")) for i, soft in enumerate(softs)
    ]
    together = served(frozen, jobs, together=True)
    assert together == served(frozen, jobs, together=False), name
    assert len({tuple(t) for t in together}) > 1


def test_one_training_step_publishes_a_prompt_peft_loads_with_our_logits(family, tokenizer, tmp_path):
    from peft import PeftModel

    name = family[0]
    frozen = from_loaded(tiny_family_model(name, len(tokenizer), seed=1), tokenizer, base_model=f"tiny-{name}")
    # short inputs: in the all-sliding families the prompt must lie within the layers' reach of the answer
    examples = parse_examples([f'{{"input": "{e["input"]}", "output": "{e["output"]}"}}' for e in SENTIMENT])
    config = TrainConfig(
        init_text="Classify the sentiment.", steps=1, batch_size=2, warmup_steps=1, eval_every=1, lr=0.05
    )
    result = train_prompt(frozen, examples[4:], examples[2:4], config)
    assert result.metrics["steps_run"] == 1 and result.metrics["cosine_min"] >= 0.95 - 1e-4
    assert not torch.equal(result.final_embeddings, result.init_embeddings)  # the step moved the prompt
    with torch.no_grad():  # it started from what the model reads for the text (Gemma scales its embeddings)
        start = frozen.token_embeddings(tokenizer(config.init_text, add_special_tokens=False).input_ids)
    torch.testing.assert_close(result.init_embeddings, start)
    with open_store(tmp_path / "store") as store:
        version = publish_result(store, "senti", frozen, result)
        loaded = store.load(str(version.id), expect=frozen.fingerprint).embeddings
        exported = store.export(str(version.id), tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(frozen.model, str(exported)).eval()
    ids = torch.tensor([[5, 17, 42, 9, 3, 11, 8, 30]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1] :]
        batch = prepend_soft_prompt(loaded, frozen.embedding(ids), torch.ones_like(ids))
        ours = frozen.model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits[:, -ids.shape[1] :]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
