"""Which KV stream a sequence goes to: the prompt cache of a batching LLM engine, as pure
decisions over token lists (no model library here, so the choices are tested alone).

A stream is one sequence's place in the KV cache. A free stream remembers the tokens its
last sequence left in it; a new sequence sharing a prefix with them evaluates only the
rest. A busy stream's prefix can be had too, by copying the stream.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

# a copy of a whole stream costs about what evaluating a few tokens does on a CPU (the
# stream's KV buffer is copied, not just the shared cells): below this gain it is skipped
COPY_MIN_TOKENS = 8

_clock = itertools.count(1)


class Stream:
    def __init__(self, index: int):
        self.index = index
        self.seq: Any = None              # the sequence using it (has history, n_past)
        self.tokens: list[int] = []       # what a free stream still holds
        self.freed_at = 0                 # order of release: the oldest free one goes first

    def take(self, seq: Any) -> None:
        self.seq, self.tokens = seq, []

    def release(self, tokens: list[int]) -> None:
        self.seq, self.tokens, self.freed_at = None, tokens, next(_clock)

    def shared(self, history: Sequence[int]) -> int:
        """Tokens at the start of `history` this stream's KV already holds."""
        if self.seq is not None:
            return common_prefix(self.seq.history, history, self.seq.n_past)
        return common_prefix(self.tokens, history, len(self.tokens))


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pick_stream(streams: list[Stream], free: list[Stream],
                history: Sequence[int]) -> tuple[Stream, Stream | None, int]:
    """(destination, stream to copy from or None, tokens already in place).

    The free stream sharing the most wins (the one freed longest ago on a tie, so recent
    prompts stay cached longest); a longer prefix held by any other stream is copied when
    it saves COPY_MIN_TOKENS or more. A copy goes to the free stream freed longest ago."""
    best_free = max(free, key=lambda s: (s.shared(history), -s.freed_at))
    own = best_free.shared(history)
    best = max(streams, key=lambda s: s.shared(history))
    gain = best.shared(history) - own
    if best is not best_free and gain >= COPY_MIN_TOKENS:
        dst = min(free, key=lambda s: s.freed_at)
        return dst, best, best.shared(history)
    return best_free, None, own


def worth_waiting(streams: list[Stream], prefilling: list[Any], history: Sequence[int]) -> bool:
    """Whether a new sequence should wait a step for a prefix another one is evaluating
    right now. Requests sent together mostly share their start (the chat template's system
    prompt, a common instruction); placed in the same step each would evaluate it once more.
    Waiting a step and then copying costs the leader's prefill, which it would have paid
    alongside anyway."""
    have = max(s.shared(history) for s in streams)
    coming = max((common_prefix(o.history, history, len(o.history)) for o in prefilling),
                 default=0)
    return coming - have >= COPY_MIN_TOKENS
