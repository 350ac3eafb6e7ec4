from __future__ import annotations

import pytest

from core.layout import ChatLayout


def test_soft_prompt_opens_the_user_turn(tokenizer):
    layout = ChatLayout(tokenizer).for_input("hello")
    head = tokenizer.decode(layout.head_ids)
    tail = tokenizer.decode(layout.tail_ids)
    assert head.endswith("<|im_start|>user\n") and "system" in head
    assert tail == "hello<|im_end|>\n<|im_start|>assistant\n"


def test_head_is_the_same_for_every_single_turn_query(tokenizer):
    layout = ChatLayout(tokenizer)
    assert layout.for_input("a").head_ids == layout.for_input("something else").head_ids


def test_soft_prompt_opens_the_last_user_turn_of_a_chat(tokenizer):
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    layout = ChatLayout(tokenizer).for_messages(messages)
    assert "first" in tokenizer.decode(layout.head_ids)
    assert tokenizer.decode(layout.tail_ids).startswith("second<|im_end|>")


def test_without_chat_template_input_is_raw_text(tokenizer):
    layout = ChatLayout(tokenizer, use_chat_template=False).for_input("hello")
    assert tokenizer.decode(layout.tail_ids) == "hello"


def test_messages_without_user_turn_are_refused(tokenizer):
    with pytest.raises(ValueError, match="user"):
        ChatLayout(tokenizer).for_messages([{"role": "system", "content": "x"}])


def test_target_ends_with_end_of_turn(tokenizer):
    ids = ChatLayout(tokenizer).target_ids("positive")
    assert ids[-1] == tokenizer.eos_token_id
