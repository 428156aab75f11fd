"""Stage-1 corpus index: FAISS pre-filter + exact T-MASS re-ranking, persistence, shards."""
from lavis_c2f.index.ann import AnnConfig, AnnIndex  # noqa: F401
from lavis_c2f.index.corpus_index import (  # noqa: F401
    FORMAT_VERSION, CorpusIndex, IndexFormatError, IndexMismatchError, search_shards)
