"""MESM's part-of-speech masking weights of FW-MESM, through nltk's averaged-perceptron tagger.

MESM's tokenizers tag the query's tokens with ``nltk.pos_tag`` (for the CLIP tokenizer: the
BPE pieces, ``</w>`` removed, tagged as one sequence) and give weight

    w(token) = 2 if its Penn tag contains NN, VB, JJ or RB (nouns, verbs, adjectives,
               adverbs) else 1,

with 0 for the start/end tokens; the masked words are drawn with ``p = w / sum(w)``
(:func:`~.mesm.choose_masked_words`). ``nltk.pos_tag(tokens)`` is ``PerceptronTagger().tag``,
which :class:`PosTagger` calls with the tagger data loaded from a local source, never
downloaded. The data is looked up in this order:

1. ``path`` (config ``model.pos_tagger``): an ``nltk_data`` folder, a
   ``taggers/averaged_perceptron_tagger_eng`` folder (nltk >= 3.9 JSON files, the data MESM's
   nltk used), or a legacy ``averaged_perceptron_tagger.pickle`` / ``trontagger-*.pickle``
   file (read with an unpickler that only admits plain containers);
2. nltk's own search path (``NLTK_DATA`` and the standard folders), JSON data only;
3. the ``textblob-aptagger`` registry package (pinned in requirements-lock.txt), which ships
   Honnibal's original averaged-perceptron model ``trontagger-0.1.0.pickle``. nltk's tagger
   was ported from it, but nltk's data was trained again: a few tags differ (e.g. "jumps" NNS
   vs VBZ). The weight only changes when a tag crosses the content/function boundary; use
   nltk's data (1. or 2.) for MESM's exact weights.

Without any of them, asking for POS weights raises :class:`PosTaggerUnavailable`, saying how
to provide the data. The inverse-frequency weights of :mod:`.vocab` need no tagger.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from typing import Any, List, Optional, Sequence, Tuple

CONTENT_TAGS = ("NN", "VB", "JJ", "RB")
_NLTK_JSON_DIR = os.path.join("taggers", "averaged_perceptron_tagger_eng")
_NLTK_PICKLE = os.path.join("taggers", "averaged_perceptron_tagger",
                            "averaged_perceptron_tagger.pickle")


class PosTaggerUnavailable(RuntimeError):
    """No averaged-perceptron tagger data could be found (the message says how to add it)."""


def content_weight(tag: str) -> int:
    """MESM's weight of a Penn tag: 2 for nouns, verbs, adjectives and adverbs, else 1."""
    return 2 if any(t in tag for t in CONTENT_TAGS) else 1


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, tuples, strings, numbers and sets only (the tagger pickles' content)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
            return set
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a tagger pickle")


def _json_files(folder: str) -> Optional[Tuple[str, str, str]]:
    names = [os.path.join(folder, f"averaged_perceptron_tagger_eng.{part}.json")
             for part in ("weights", "tagdict", "classes")]
    return tuple(names) if all(os.path.isfile(n) for n in names) else None  # type: ignore[return-value]


def _resolve(path: str) -> Tuple[str, str]:
    """(kind "json" | "pickle", location) of a user-given tagger path."""
    if os.path.isfile(path):
        return "pickle", path
    if not os.path.isdir(path):
        raise PosTaggerUnavailable(f"POS tagger data not found: {path}")
    for folder in (path, os.path.join(path, _NLTK_JSON_DIR)):
        if _json_files(folder):
            return "json", folder
    for name in (os.path.join(path, _NLTK_PICKLE), os.path.join(path, "averaged_perceptron_tagger.pickle")):
        if os.path.isfile(name):
            return "pickle", name
    raise PosTaggerUnavailable(
        f"{path} holds no averaged-perceptron tagger data (expected {_NLTK_JSON_DIR}/"
        "averaged_perceptron_tagger_eng.{weights,tagdict,classes}.json or "
        f"{_NLTK_PICKLE})")


def _package_pickle() -> Optional[str]:
    spec = importlib.util.find_spec("textblob_aptagger")
    if spec is None or spec.origin is None:
        return None
    name = os.path.join(os.path.dirname(spec.origin), "trontagger-0.1.0.pickle")
    return name if os.path.isfile(name) else None


def _nltk_json_dir() -> Optional[str]:
    import nltk

    try:
        return str(nltk.data.find(_NLTK_JSON_DIR.replace(os.sep, "/") + "/"))
    except LookupError:
        return None


class PosTagger:
    """nltk's ``PerceptronTagger`` with data from a local source (module doc).

    Args:
        path: tagger data (see module doc); None = nltk's data path, then the
            ``textblob-aptagger`` package.
    Attributes:
        source: where the data came from (for logs and messages).
    Raises:
        PosTaggerUnavailable: no data found (or nltk missing), with how to provide it.
    """

    def __init__(self, path: Optional[str] = None):
        try:
            from nltk.tag.perceptron import PerceptronTagger
        except ImportError as err:  # pragma: no cover - nltk is pinned
            raise PosTaggerUnavailable(f"POS weights need nltk ({err}); install the pinned "
                                       "requirements (requirements-lock.txt)") from None
        if path is not None:
            kind, location = _resolve(os.path.abspath(os.path.expanduser(path)))
        else:
            location = _nltk_json_dir()
            kind = "json"
            if location is None:
                location, kind = _package_pickle(), "pickle"
            if location is None:
                raise PosTaggerUnavailable(
                    "MESM's part-of-speech masking weights (model.fw_word_weights: pos) need "
                    "nltk's averaged-perceptron tagger data, and none was found. Either install "
                    "the pinned 'textblob-aptagger' package (pip install textblob-aptagger==0.2.0), "
                    "or put nltk's 'averaged_perceptron_tagger_eng' data in a local nltk_data "
                    "folder and set model.pos_tagger (or NLTK_DATA) to it, or use "
                    "model.fw_word_weights: inverse_frequency (no tagger).")
        tagger = PerceptronTagger(load=False)
        if kind == "json":
            tagger.load_from_json(lang="eng", loc=location + os.sep)
        else:
            with open(location, "rb") as f:
                try:
                    weights, tagdict, classes = _PlainUnpickler(f, encoding="latin1").load()
                except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as err:
                    raise PosTaggerUnavailable(f"{location}: not a tagger pickle ({err})") from None
            tagger.model.weights, tagger.tagdict = weights, tagdict
            tagger.classes = tagger.model.classes = set(classes)
        self._tagger = tagger
        self.source = location

    def tags(self, tokens: Sequence[str]) -> List[str]:
        """Penn tags of ``tokens`` tagged as one sequence (``nltk.pos_tag``)."""
        if not tokens:
            return []
        return [tag for _, tag in self._tagger.tag(list(tokens))]

    def weights(self, tokens: Sequence[str]) -> List[int]:
        """MESM's weight (:func:`content_weight`) of each token."""
        return [content_weight(t) for t in self.tags(tokens)]


@functools.lru_cache(maxsize=4)
def get_pos_tagger(path: Optional[str] = None) -> PosTagger:
    """Shared :class:`PosTagger` per data path (loading takes about a second)."""
    return PosTagger(path)


def pos_token_weights(query: str, tokens: Sequence[Any], tokenizer: Any, tagger: PosTagger,
                      start: Any = None, end: Any = None) -> List[float]:
    """MESM's weights of the (possibly truncated) token row ``tokens`` of ``query``.

    As MESM's tokenizers, the whole query is tagged first (``tokenizer.words`` then
    ``tokenizer.piece`` of each token: BPE pieces or words) and the weights are then cut to the
    row; positions holding ``start`` / ``end`` get 0.

    Args:
        query: the text; tokens: its token row (start + words + end, or words only).
        tokenizer: a :mod:`.vocab` tokenizer; tagger: a :class:`PosTagger`.
    Returns:
        one weight per entry of ``tokens``.
    """
    body = [tokenizer.piece(t) for t in tokenizer.words(query)]
    weights = iter(tagger.weights(body))
    out: List[float] = []
    for t in tokens:
        if (start is not None and t == start) or (end is not None and t == end):
            out.append(0.0)
        else:
            out.append(float(next(weights, 1)))
    return out
