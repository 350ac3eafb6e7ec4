"""Where the soft prompt sits in the token sequence, the same in training and serving.

With a chat template, the soft prompt is the START OF THE LAST USER TURN:

    [template head ... "<|im_start|>user\\n"] [SOFT PROMPT] [user text "<|im_end|>\\n<|im_start|>assistant\\n"]

so it reads like an instruction the user typed before their query. Everything before it
(`head_ids`) plus the soft prompt is a fixed prefix for a single-turn request, which is what
the server caches. Without a chat template the soft prompt follows the BOS token (if any)
and the raw input follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_SENTINEL = "\u2063SOFTPROMPT\u2063"


@dataclass(frozen=True)
class PromptLayout:
    """Token ids around the soft prompt: `head_ids` before it, `tail_ids` after it."""

    head_ids: tuple[int, ...]
    tail_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.head_ids) + len(self.tail_ids)


class ChatLayout:
    """Builds PromptLayouts for a tokenizer, with or without its chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_template:
            raise ValueError("This tokenizer has no chat template; use use_chat_template=False.")

    def for_input(self, text: str) -> PromptLayout:
        """Layout for a single user query."""
        return self.for_messages([{"role": "user", "content": text}])

    def for_messages(self, messages: list[dict]) -> PromptLayout:
        """Layout for a chat: the soft prompt opens the last user message."""
        user_turns = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not user_turns:
            raise ValueError("messages need at least one message with role 'user'.")
        if not self.use_chat_template:
            text = "\n".join(m["content"] for m in messages)
            head = self.tokenizer("", add_special_tokens=True).input_ids
            return PromptLayout(tuple(head), tuple(self._encode(text)))
        last = user_turns[-1]
        marked = [dict(m) for m in messages]
        marked[last]["content"] = _SENTINEL + marked[last]["content"]
        rendered = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
        head, tail = rendered.split(_SENTINEL, 1)
        return PromptLayout(tuple(self._encode(head)), tuple(self._encode(tail)))

    def target_ids(self, output: str) -> list[int]:
        """Tokens the model should produce for `output`, closed by the end-of-turn/EOS token."""
        ids = self._encode(output)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids
