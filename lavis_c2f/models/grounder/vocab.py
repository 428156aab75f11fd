"""Token counts and the reconstruction vocabulary of FW-MESM (tokenizers: :mod:`lavis_c2f.data.tokenizers`).

FW-MESM reconstructs query words from the clips of the ground-truth moment. Its classifier
covers the ``vocab_size`` most frequent training tokens plus three special classes
(``<unknown>`` = V, ``<start>`` = V + 1, ``<end>`` = V + 2), as in MESM. Which words get
masked is drawn with probabilities proportional to a per-token weight:

* ``pos`` (MESM, the default): 2 for nouns/verbs/adjectives/adverbs, 1 otherwise, 0 for the
  start/end tokens, unknown tokens included (:mod:`.pos_weights`, needs tagger data);
* ``inverse_frequency`` (documented variant, no tagger): ``1 / count`` of the token, 0 for
  special and out-of-vocabulary tokens (rare, informative words are masked more often).

Counts files: ours (written atomically by ``lavis-c2f vocab``)::

    {"format": "lavis_c2f.token_counts", "version": 1, "tokenizer": "clip" | "whitespace",
     "num_queries": N, "num_tokens": T, "counts": [[token, count], ...]}   # most frequent first

or MESM's own ``*_tokenized_count.txt`` (one ``ID COUNT`` line per CLIP BPE id, or
``WORD ID COUNT`` per GloVe word; the first ``vocab_size`` lines in file order are the
classes). Tokens are CLIP BPE ids (int) for ``clip`` and lower-cased words (str) for
``whitespace``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.common.io import iter_jsonl, read_json, write_json
from lavis_c2f.data.tokenizers import (TOKENIZERS, ClipTokenizer, Token,  # noqa: F401 (re-exported)
                                       WhitespaceTokenizer, get_tokenizer)

COUNTS_FORMAT = "lavis_c2f.token_counts"


def count_tokens(queries: Iterable[str], tokenizer: str = "clip") -> Tuple[Counter, int]:
    """Token counts over ``queries`` (special tokens excluded) and the number of queries."""
    tok = get_tokenizer(tokenizer)
    counts: Counter = Counter()
    n = 0
    for text in queries:
        counts.update(tok.words(text))
        n += 1
    return counts, n


def read_queries(path: str) -> List[str]:
    """The ``query`` field of every row of a QVHighlights-style JSON-lines file."""
    out = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str):
            raise DataFormatError("row has no string 'query'", path=path, line=lineno,
                                  field="query")
        out.append(row["query"])
    return out


def write_counts(counts: Counter, num_queries: int, tokenizer: str, path: str) -> str:
    """Write a counts file (most frequent first, ties by token) atomically."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return write_json({"format": COUNTS_FORMAT, "version": 1, "tokenizer": tokenizer,
                       "num_queries": num_queries, "num_tokens": int(sum(counts.values())),
                       "counts": [[tok, int(c)] for tok, c in items]}, path)


@dataclass
class ReconstructionVocab:
    """The ``vocab_size`` most frequent tokens of a counts file, with class labels and
    masking weights.

    Attributes:
        tokenizer: ``"clip"`` or ``"whitespace"``.
        vocab_size: V; the classifier has V + 3 classes.
        label_of: token -> class index in [0, V).
        weight_of: token -> unnormalised masking weight (1 / count).
    """

    tokenizer: str
    vocab_size: int
    label_of: Dict[Token, int]
    weight_of: Dict[Token, float]

    @property
    def unknown_label(self) -> int:
        return self.vocab_size

    @property
    def start_label(self) -> int:
        return self.vocab_size + 1

    @property
    def end_label(self) -> int:
        return self.vocab_size + 2

    @property
    def num_classes(self) -> int:
        return self.vocab_size + 3

    @classmethod
    def from_counts_file(cls, path: str, vocab_size: int,
                         tokenizer: Optional[str] = None) -> "ReconstructionVocab":
        """Load a counts file (ours or MESM's ``.txt``); ``tokenizer`` (if given) must match
        the file's."""
        if str(path).endswith(".txt"):
            return cls._from_official_txt(path, vocab_size, tokenizer)
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != COUNTS_FORMAT:
            raise DataFormatError(f"not a token-counts file (format '{COUNTS_FORMAT}' expected)",
                                  path=path, field="format")
        tok = data.get("tokenizer")
        if tok not in TOKENIZERS:
            raise DataFormatError(f"unknown tokenizer {tok!r}", path=path, field="tokenizer")
        if tokenizer is not None and tokenizer != tok:
            raise DataFormatError(f"counts were made with tokenizer '{tok}' but '{tokenizer}' "
                                  "is configured", path=path, field="tokenizer")
        counts = data.get("counts")
        if not isinstance(counts, list):
            raise DataFormatError("'counts' must be a list of [token, count]", path=path,
                                  field="counts")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        label_of: Dict[Token, int] = {}
        weight_of: Dict[Token, float] = {}
        for i, entry in enumerate(counts[:vocab_size]):
            if (not isinstance(entry, list) or len(entry) != 2
                    or not isinstance(entry[1], int) or entry[1] <= 0):
                raise DataFormatError(f"entry {i} is not [token, positive count]: {entry!r}",
                                      path=path, field="counts")
            token = int(entry[0]) if tok == "clip" else str(entry[0])
            label_of[token] = i
            weight_of[token] = 1.0 / float(entry[1])
        return cls(tok, vocab_size, label_of, weight_of)

    @classmethod
    def _from_official_txt(cls, path: str, vocab_size: int,
                           tokenizer: Optional[str]) -> "ReconstructionVocab":
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        label_of: Dict[Token, int] = {}
        weight_of: Dict[Token, float] = {}
        kind = None
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if len(label_of) == vocab_size:
                    break
                parts = line.split()
                if not parts:
                    continue
                try:
                    if len(parts) == 2:
                        token, count, this = int(parts[0]), int(parts[1]), "clip"
                    elif len(parts) == 3:
                        token, count, this = parts[0], int(parts[2]), "whitespace"
                    else:
                        raise ValueError(line.strip())
                except ValueError:
                    raise DataFormatError("expected 'ID COUNT' (CLIP) or 'WORD ID COUNT' (GloVe)",
                                          path=path, line=lineno) from None
                if kind is not None and this != kind:
                    raise DataFormatError("lines mix the CLIP and GloVe layouts", path=path,
                                          line=lineno)
                kind = this
                label_of[token] = len(label_of)
                weight_of[token] = 1.0 / max(count, 1)
        if kind is None:
            raise DataFormatError("no counts", path=path)
        if tokenizer is not None and tokenizer != kind:
            raise DataFormatError(f"counts are for tokenizer '{kind}' but '{tokenizer}' is "
                                  "configured", path=path)
        return cls(kind, vocab_size, label_of, weight_of)

    def encode(self, tokens: Sequence[Token], start_token: Optional[Token] = None,
               end_token: Optional[Token] = None) -> Tuple[List[int], List[float], List[bool]]:
        """Per token: class label, masking weight and "unknown" flag.

        The start/end tokens get the ``<start>`` / ``<end>`` labels and weight 0; tokens
        outside the vocabulary get ``<unknown>`` and weight 0.
        """
        labels, weights, unknown = [], [], []
        for t in tokens:
            if start_token is not None and t == start_token:
                labels.append(self.start_label); weights.append(0.0); unknown.append(False)
            elif end_token is not None and t == end_token:
                labels.append(self.end_label); weights.append(0.0); unknown.append(False)
            elif t in self.label_of:
                labels.append(self.label_of[t]); weights.append(self.weight_of[t])
                unknown.append(False)
            else:
                labels.append(self.unknown_label); weights.append(0.0); unknown.append(True)
        return labels, weights, unknown
