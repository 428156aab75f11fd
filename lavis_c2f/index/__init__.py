"""Stage-1 corpus index: FAISS pre-filter + exact T-MASS re-ranking, persistence, shards.

* :mod:`.base`: :class:`StageOneIndex`, the interface the coarse-to-fine engine searches through;
* :mod:`.store` (rows of encoded videos and their files), :mod:`.prefilter` (FAISS candidates,
  :mod:`.ann`), :mod:`.corpus_index` (exact re-ranking search; the :class:`CorpusIndex`);
* :mod:`.corpora`: what a predictor searches (an index of videos, the demo corpus);
* :mod:`.build`: videos -> features -> index (``lavis-c2f index videos``); :mod:`.cli`: the commands.
"""
from lavis_c2f.index.ann import AnnConfig, AnnIndex  # noqa: F401
from lavis_c2f.index.base import StageOneIndex  # noqa: F401
from lavis_c2f.index.corpus_index import (  # noqa: F401
    FORMAT_VERSION, CorpusIndex, IndexFormatError, IndexMismatchError, search_shards)
