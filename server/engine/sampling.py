"""Next-token choice per row: greedy, or temperature + nucleus (top-p) with a per-request seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.errors import SamplingError

SEEDS = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. `temperature` None or 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | Exception]:
    """One token per row of `logits` [B, V] (fp32); greedy rows in one argmax.

    A row whose sampling fails gets its exception in place of a token, so one bad row never
    costs the others theirs."""
    choices: list[int | Exception] = logits.argmax(dim=-1).tolist()  # [B]
    for row, p in enumerate(params):
        if not p.greedy:
            try:
                choices[row] = sample_row(logits[row].float(), p, generators[row])
            except Exception as exc:  # e.g. NaN logits from the model: fail this row only
                choices[row] = SamplingError(f"sampling failed: {exc}")
    return choices


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Temperature + nucleus sampling over one row's logits [V].

    Scaling `logits - max` (all <= 0) cannot overflow for any temperature > 0: a tiny one drives
    every other token to -inf and the top token stays exp(0) = 1, never NaN. The top token is
    always kept by top-p, however small top_p is."""
    probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)  # [V]
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        drop[0] = False
        pick = torch.multinomial(sorted_probs.masked_fill(drop, 0.0), 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


# (token id, its log-probability, [(alternative id, log-probability), ...] best first)
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprob]:
    """Log-probabilities of the chosen `tokens` under the model's distribution (logits [b, V],
    before temperature and top-p, as vLLM and OpenAI report them), with `top[i]` alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [b, V]
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1)).squeeze(1).tolist()  # [b]
    k = max(top)
    best = logp.topk(k, dim=-1) if k else None
    out = []
    for row, (token, value) in enumerate(zip(tokens, chosen)):
        alternatives = []
        if top[row]:
            alternatives = list(zip(best.indices[row, : top[row]].tolist(), best.values[row, : top[row]].tolist()))
        out.append((token, value, alternatives))
    return out


def rows_logprobs(logits: torch.Tensor, tokens: list, params: list[SamplingParams]) -> dict[int, TokenLogprob]:
    """Row -> its chosen token's log-probability and alternatives, for the rows that asked (and got a token)."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None and isinstance(tokens[i], int)]
    if not rows:
        return {}
    return dict(zip(rows, token_logprobs(logits[rows], [tokens[i] for i in rows], [params[i].logprobs for i in rows])))
