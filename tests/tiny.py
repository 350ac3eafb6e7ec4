"""Tiny random models and a tiny tokenizer with a chat template, built in memory for fast tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Please reason step by step and give the answer.",
    "Classify the sentiment of this review as positive or negative.",
    "The movie was great fun, a wonderful film. The plot was dull and boring, a bad movie.",
    "What is two plus three? The answer is five. Yes No positive negative",
    "0 1 2 3 4 5 6 7 8 9 + - = ? ! . , the a an of to in is was and or",
]
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~300 tokens) trained on a few sentences, with ChatML."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_llama(vocab_size: int, *, seed: int = 0, hidden_size: int = 64) -> LlamaForCausalLM:
    """A 2-layer random Llama small enough to run a forward pass in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a larger embedding scale makes greedy choices
    # depend clearly on the input, so "same tokens" comparisons are meaningful.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    return model.eval()
