"""Stage-1 retrievers: T-MASS + UCoFiA-style scoring (``c2f_tmass_retriever``) and UCoFiA itself
(``c2f_ucofia_retriever``, which loads the official checkpoint)."""
from lavis_c2f.models.retriever.embeddings import (  # noqa: F401
    TextEmbedding, UCoFiAText, UCoFiAVideo, VideoEmbedding)
from lavis_c2f.models.retriever.tmass import C2FTMassRetriever, MeanPoolingBaseline  # noqa: F401
from lavis_c2f.models.retriever.ucofia import C2FUCoFiA  # noqa: F401
from lavis_c2f.models.retriever.ucofia_checkpoint import (  # noqa: F401
    init_ucofia_from_clip, load_ucofia_checkpoint)
