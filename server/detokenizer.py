"""Incremental detokenization: text deltas that never split a character or leak a stop string."""

from __future__ import annotations

from baton.scheduler.sampling_params import SamplingParams

# How many prompt tokens seed the decode window, so that the first output token is decoded in
# context (a SentencePiece "▁word" keeps its leading space, as in a full decode).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas, one `add` per token.

    The window `ids[prefix_offset:]` is decoded and compared with `ids[prefix_offset:read_offset]`,
    the text already emitted from it; a decode ending in U+FFFD waits for the rest of its bytes.
    With stop strings, the last `max(len(stop)) - 1` characters are held back until the next
    delta shows whether they start a stop string. `flush` emits what is held back at the end.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""  # all text emitted so far
        self.stop_hit: str | None = None
        self._ids = list(prompt_token_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._held = ""  # decoded text held back for stop-string matching
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        # NOTE: no clean-up of tokenization spaces: it rewrites text across delta boundaries.
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _advance(self, final: bool) -> str:
        """Text the window gained since the last advance; "" while a character is incomplete."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        # NOTE: drop what no later decode needs, so the window stays a few tokens long.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def add(self, token_id: int) -> str:
        """Feeds one output token; returns the text to emit now (possibly "")."""
        if self.stop_hit is not None:
            return ""
        self._ids.append(token_id)
        return self._emit(self._advance(final=False))

    def flush(self) -> str:
        """Emits everything still held back; call once when the sequence ends without a stop."""
        if self.stop_hit is not None:
            return ""
        delta = self._emit(self._advance(final=True))
        if self.stop_hit is None:
            delta += self._held
            self.text += self._held
            self._held = ""
        return delta

    def _emit(self, piece: str) -> str:
        if not self.params.stop:
            self.text += piece
            return piece
        if not piece:
            return ""
        # NOTE: `_held` holds no complete stop string, so every match here ends inside `piece`.
        buf = self._held + piece
        hit = self._find_stop(buf)
        if hit is not None:
            stop, start = hit
            cut = start + len(stop) if self.params.include_stop_str_in_output else start
            out, self._held = buf[:cut], ""
            self.stop_hit = stop
        else:
            split = max(len(buf) - self._holdback, 0)
            out, self._held = buf[:split], buf[split:]
        self.text += out
        return out

    def _find_stop(self, buf: str) -> tuple[str, int] | None:
        """The stop string that completes first in `buf` (the longest of those ending together)."""
        best: tuple[int, int, str] | None = None
        for stop in self.params.stop:
            start = buf.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        return best[2], best[1]
