"""Text out: the model's text tokens -> a transcript, with Kyutai's SentencePiece tokenizer.

The text stream of Moshi is mostly padding. Kept as text: ids in [0, vocabulary) except
  * 3, the text padding token (`MoshiVisConfig.padding_token_id`), and 0, the end-of-padding marker
    (`end_of_text_padding_id` in Kyutai's MoshiVis class); Kyutai's server skips exactly these two;
  * control pieces (`<s>`, `</s>`), which are not text;
and never -2 (ungenerated: the warm-up frames), -1 (zero token) or the initial token (text_card).
Pieces join as SentencePiece decodes them (`▁` is a space, byte-fallback pieces become characters).
"""
from __future__ import annotations

from pathlib import Path

try:
    import sentencepiece
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("moshivis.text needs sentencepiece (pip install 'moshivis-kernels[chat]')") from e

from .config import END_OF_PADDING


class TextError(ValueError):
    """A missing or unreadable tokenizer, or one too small for the model."""


class TextTokenizer:
    """Kyutai's `tokenizer_spm_32k_3.model` (or any SentencePiece model) for the model's text tokens."""

    def __init__(self, path: str | Path, text_card: int | None = None, padding_id: int = 3):
        path = Path(path)
        if not path.is_file():
            raise TextError(f"text tokenizer {path} does not exist")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TextError(f"text tokenizer {path} is not a SentencePiece model: {e}") from e
        self.vocab_size = self.sp.get_piece_size()
        if text_card is not None and text_card > self.vocab_size:
            raise TextError(f"text tokenizer {path} has {self.vocab_size} pieces but the model emits "
                            f"{text_card} text ids (config text_card)")
        self._skip = {END_OF_PADDING, padding_id}

    def is_text(self, token: int) -> bool:
        return 0 <= token < self.vocab_size and token not in self._skip and not self.sp.is_control(token)

    def decode(self, tokens) -> str:
        """The transcript of a sequence of text tokens (non-text tokens dropped)."""
        return self.sp.decode([int(t) for t in tokens if self.is_text(int(t))])

    def stream(self) -> "TranscriptStream":
        return TranscriptStream(self)


class TranscriptStream:
    """Feed text tokens one per frame; `push` returns the text they add (possibly "")."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._shown = ""

    def push(self, token: int) -> str:
        token = int(token)
        if not self.tokenizer.is_text(token):
            return ""
        self.ids.append(token)
        # An unfinished multi-byte character decodes to U+FFFD until its last byte arrives: hold it back.
        stable = self.text.rstrip("\ufffd")
        if not stable.startswith(self._shown):
            return ""
        new, self._shown = stable[len(self._shown):], stable
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.sp.decode(self.ids)
