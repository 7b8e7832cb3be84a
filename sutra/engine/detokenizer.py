"""Incremental detokenization and stop strings for one completion."""

from __future__ import annotations

from sutra.model.tokenizer import Tokenizer
from sutra.outputs import CompletionOutput
from sutra.sampling_params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        # Decoding starts from a few prompt tokens so the first output token gets its leading space.
        self.ids = list(prompt_token_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._stop_tail = max((len(s) for s in params.stop), default=0)

    def state(self) -> tuple[list[int], int, int]:
        """What continuing elsewhere needs (a migrated request): the decode window and offsets."""
        return list(self.ids), self.prefix_offset, self.read_offset

    def restore(self, state: tuple[list[int], int, int]) -> None:
        ids, self.prefix_offset, self.read_offset = state
        self.ids = list(ids)

    def add(self, output: CompletionOutput, token_id: int, final: bool = False) -> str | None:
        """Append one token's text to output.text; return the stop string it completed, if any.
        final: this is the completion's last token, so text held back for a character that later
        tokens would have completed is flushed (as U+FFFD, the way decode() renders it)."""
        self.ids.append(token_id)
        new_text, self.prefix_offset, self.read_offset = self.tokenizer.decode_incremental(
            self.ids, self.prefix_offset, self.read_offset, self.params.skip_special_tokens, final=final
        )
        if not new_text:
            return None
        if len(output.token_ids) < self.params.min_tokens:
            output.text += new_text  # stop strings count only from min_tokens on, as in vLLM
            return None
        searched_from = max(0, len(output.text) - self._stop_tail + 1)
        output.text += new_text
        found = [
            (at, stop) for stop in self.params.stop if (at := output.text.find(stop, searched_from)) != -1
        ]
        if not found:
            return None
        at, stop = min(found)
        output.text = output.text[: at + len(stop) if self.params.include_stop_str_in_output else at]
        return stop
