"""Stage-1 retriever: T-MASS + UCoFiA-style scoring (registers ``c2f_tmass_retriever``)."""
from lavis_c2f.models.retriever.embeddings import TextEmbedding, VideoEmbedding  # noqa: F401
from lavis_c2f.models.retriever.tmass import C2FTMassRetriever, MeanPoolingBaseline  # noqa: F401
