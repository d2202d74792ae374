"""Incremental detokenization and stop-string handling for streamed generation."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas that never split a multi-byte character.

    Decodes a short window (``prefix_offset:``) once per token, so cost stays flat with length;
    the window's already-released prefix is decoded only when the window moves.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.prefix_text = ""
        # The Rust tokenizer directly when the wrapper would not post-process (a third of the cost).
        clean = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._backend = None if clean else getattr(tokenizer, "backend_tokenizer", None)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(self.prefix_text) and not full.endswith("\ufffd"):
            out = full[len(self.prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            return out
        return ""


class StopMatcher:
    """Holds back text that could still grow into a stop string; cuts output at the first stop."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(stop)
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; return what is now safe to emit (the text before any stop)."""
        if self.stopped:
            return ""
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of generation, release held-back text that never became a stop string."""
        out, self.pending = self.pending, ""
        return "" if self.stopped else out
