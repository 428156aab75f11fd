"""Text tokenizers shared by the models and the data pipeline (no model import).

* :class:`ClipTokenizer` -- CLIP's byte-level BPE (the vocabulary bundled with LAVIS; ids as
  in OpenAI CLIP and ``transformers.CLIPTokenizer``). ``tokenize`` gives
  ``[SOT] + BPE(text)[:max_len - 2] + [EOT]`` (ftfy, HTML unescape and lower case first), the
  layout of MESM's reconstruction targets and of CLIP4Clip / UCoFiA's text arrays.
* :class:`WhitespaceTokenizer` -- MESM's word tokenizer.
"""
from __future__ import annotations

import string
from typing import Any, Dict, List, Optional, Union

Token = Union[int, str]
TOKENIZERS = ("clip", "whitespace")


class WhitespaceTokenizer:
    """Lower-case, punctuation to spaces, split on whitespace (MESM's word tokenizer).
    No special tokens."""

    name = "whitespace"
    start_token: Optional[Token] = None
    end_token: Optional[Token] = None
    _table = str.maketrans(string.punctuation, " " * len(string.punctuation))

    @staticmethod
    def piece(token: Token) -> str:
        return str(token)

    def words(self, text: str) -> List[str]:
        return str(text).lower().translate(self._table).split()

    def tokenize(self, text: str, max_len: Optional[int] = None) -> List[Token]:
        """Tokens of ``text`` (at most ``max_len``)."""
        toks: List[Token] = list(self.words(text))
        return toks if max_len is None else toks[:max_len]


class ClipTokenizer:
    """CLIP byte-level BPE (the vocabulary bundled with LAVIS), ids as in OpenAI CLIP and
    ``transformers.CLIPTokenizer``: start 49406, end 49407.

    ``tokenize`` returns ``[start] + bpe + [end]`` truncated like MESM (at most ``max_len``
    ids in total, the end token always kept).
    """

    name = "clip"

    def __init__(self):
        from lavis.models.clip_models.tokenizer import SimpleTokenizer  # bundled BPE

        self._bpe = SimpleTokenizer()
        self.start_token: Token = self._bpe.encoder["<start_of_text>"]
        self.end_token: Token = self._bpe.encoder["<end_of_text>"]
        self.vocab_size = self._bpe.vocab_size

    def words(self, text: str) -> List[int]:
        """BPE ids of ``text`` without special tokens."""
        return list(self._bpe.encode(str(text)))

    def piece(self, token: int) -> str:
        """The BPE piece of an id without its ``</w>`` end-of-word mark (what MESM tags)."""
        return self._bpe.decoder[int(token)].replace("</w>", "")

    def tokenize(self, text: str, max_len: Optional[int] = None) -> List[Token]:
        body = self.words(text)
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len must be >= 2 for the CLIP tokenizer, got {max_len}")
            body = body[:max_len - 2]
        return [self.start_token] + body + [self.end_token]


_TOKENIZER_CACHE: Dict[str, Any] = {}


def get_tokenizer(name: str):
    """Shared tokenizer instance for ``"clip"`` or ``"whitespace"``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer '{name}', expected one of {TOKENIZERS}")
    if name not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[name] = ClipTokenizer() if name == "clip" else WhitespaceTokenizer()
    return _TOKENIZER_CACHE[name]
