"""A text encoder for the embedded demo corpus: typed queries -> the corpus's text feature space.

The demo corpus (:mod:`lavis_c2f.data.demo_corpus`) has no videos and no text model: its query
features come from its generative process. Token ``j`` of a query (word ``w_j``, ``<sos>`` and
``<eos>`` included) is::

    A (z_{w_j} + context_mix * m_q) + text_noise * eps_j + offset_t,      m_q = normalise(sum_c z_c)

where ``z_w`` are per-word latents, ``A`` the (Dt x k) text map, ``offset_t`` the text offset and
``c`` runs over the query's concept words (subjects, adjectives, verbs, objects, places). The
``pooler_output`` is the mean of the content-word tokens (plus noise).

:class:`DemoTextEncoder` rebuilds ``z``, ``A`` and ``offset_t`` from the parameters recorded in
``corpus.json`` with :func:`~lavis_c2f.data.demo_corpus.demo_latents` (the generator's own first
draws) and the generator's vocabulary lists, and
encodes any query made of vocabulary words **without the noise terms** (the expectation of the
generator's features). Re-encoding a corpus query therefore gives its stored features up to the
generator's noise (``text_noise``; cosine about 0.98 per token with the default parameters).

Words are lower-cased and split on anything that is not a letter, digit or ``<>``. Unknown
words are skipped with a warning (:attr:`DemoTextFeatures.skipped`); a query without any known
word, or without any content word (only function words such as "the", "in"), raises
:class:`~lavis_c2f.common.errors.ConfigError` listing some known words. Concept words are
counted once each in the meaning ``m_q`` (the generator's concepts are distinct slots).

Pure numpy (no torch / LAVIS import).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data import demo_corpus as dc

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
_WORD_RE = re.compile(r"[^0-9a-z<>]+")


@dataclass
class DemoTextFeatures:
    """One encoded query.

    Attributes:
        tokens: (T, Dt) float32 ``last_hidden_state`` (``<sos>``, the known words, ``<eos>``).
        pooled: (Dt,) float32 ``pooler_output`` (mean of the content-word tokens).
        words: the T words encoded (special tokens included).
        skipped: words of the query that are not in the vocabulary (in query order).
    """

    tokens: np.ndarray
    pooled: np.ndarray
    words: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def as_npz_fields(self) -> Dict[str, np.ndarray]:
        """``{"last_hidden_state", "pooler_output"}`` (the corpus's ``qid*.npz`` layout)."""
        return {"last_hidden_state": self.tokens, "pooler_output": self.pooled}


def tokenize(text: str) -> List[str]:
    """Lower-cased words of ``text`` (split on everything but letters, digits and ``<>``)."""
    return [w for w in _WORD_RE.split(str(text).lower()) if w]


class DemoTextEncoder:
    """Deterministic text encoder of a demo corpus (see the module docstring).

    Args:
        params: the corpus's :class:`~lavis_c2f.data.demo_corpus.DemoCorpusParams`.
        corpus_id: identifier of the corpus the encoder belongs to (for :attr:`weights_id`).

    Use :meth:`from_corpus` to build it from a corpus folder.
    """

    name = "c2f_demo_text"

    def __init__(self, params: "dc.DemoCorpusParams", corpus_id: str = ""):
        self.params = params
        p = params
        dt = p.text_dim
        lat = dc.demo_latents(p)  # the generator's own first draws
        self.z: Dict[str, np.ndarray] = lat.z
        self.A = lat.A
        self.offset_t = lat.offset_t
        self.content_words = frozenset(dc.SUBJECTS + dc.ADJECTIVES + dc.VERBS + dc.OBJECTS + dc.PLACES)
        self.vocabulary = frozenset(self.z)
        self.dim = self.text_dim = int(dt)
        h = hashlib.sha256(repr(sorted(p.to_dict().items())).encode()).hexdigest()[:16]
        self._weights_id = f"{self.name}:{corpus_id or h}"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_corpus(cls, corpus_root: PathLike) -> "DemoTextEncoder":
        """The encoder of the demo corpus in ``corpus_root`` (reads its ``corpus.json``)."""
        root = os.fspath(corpus_root)
        meta_path = os.path.join(root, "corpus.json")
        meta = dc.read_corpus_meta(root)
        if meta is None:
            raise DataFormatError("not a demo corpus (no corpus.json with name 'c2f_demo'; make one with "
                                  "'lavis-c2f make-demo-corpus')", path=meta_path)
        if meta.get("version") != dc.CORPUS_VERSION:
            raise DataFormatError(f"demo corpus version {meta.get('version')!r}; this code encodes version "
                                  f"{dc.CORPUS_VERSION} (regenerate it with 'lavis-c2f make-demo-corpus --force')",
                                  path=meta_path, field="version")
        try:
            params = dc.DemoCorpusParams.from_dict(dict(meta["params"]))
        except (KeyError, TypeError, ConfigError) as e:
            raise DataFormatError(f"invalid generator parameters: {e}", path=meta_path, field="params") from None
        corpus_id = str((meta.get("content") or {}).get("sha256", ""))[:16]
        return cls(params, corpus_id=corpus_id)

    @property
    def weights_id(self) -> str:
        """``c2f_demo_text:<corpus content hash>``: identifies the corpus the features belong to."""
        return self._weights_id

    def known_words(self, n: Optional[int] = None) -> List[str]:
        """Content words of the vocabulary (sorted); the first ``n`` when given."""
        words = sorted(self.content_words)
        return words if n is None else words[:n]

    # ------------------------------------------------------------------ encoding
    def encode(self, query: str) -> DemoTextFeatures:
        """Features of one query (module docstring). Raises :class:`ConfigError` for an empty
        query, a query without known words or without content words."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        words = tokenize(query)
        if not words:
            raise ConfigError("the query is empty")
        known = [w for w in words if w in self.vocabulary and w not in ("<sos>", "<eos>")]
        skipped = [w for w in words if w not in self.vocabulary]
        examples = ", ".join(self.known_words()[::7][:12])
        if not known:
            raise ConfigError(f"no word of the query {query!r} is in the demo corpus vocabulary "
                              f"({len(self.content_words)} content words, e.g. {examples})")
        concepts = list(dict.fromkeys(w for w in known if w in self.content_words))
        if not concepts:
            raise ConfigError(f"the query {query!r} has no content word (subject, adjective, verb, object or "
                              f"place of the demo vocabulary, e.g. {examples})")
        if skipped:
            logger.warning("demo text encoder: skipped %d unknown word(s) %s (not in the demo corpus vocabulary)",
                           len(skipped), skipped)
        m = np.sum([self.z[c] for c in concepts], axis=0)
        m = m / (np.linalg.norm(m) + 1e-12)
        seq = ["<sos>"] + known + ["<eos>"]
        lat = np.stack([self.z[w] + self.params.context_mix * m for w in seq])
        tok = lat @ self.A.T + self.offset_t
        content = [j for j, w in enumerate(seq) if w in self.content_words]
        pooled = tok[content].mean(0)
        return DemoTextFeatures(tokens=tok.astype(np.float32), pooled=pooled.astype(np.float32), words=seq,
                                skipped=skipped)

    def encode_text(self, queries: Sequence[str]) -> List[DemoTextFeatures]:
        """:meth:`encode` of each query (the ``encode_text`` interface of the feature backbones:
        each result has ``tokens`` (T, Dt) and ``pooled`` (Dt,))."""
        if isinstance(queries, str):
            raise TypeError("encode_text takes a list of strings")
        return [self.encode(q) for q in queries]

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "weights_id": self.weights_id, "dim": self.dim, "text_dim": self.text_dim}


__all__ = ["DemoTextEncoder", "DemoTextFeatures", "tokenize"]
