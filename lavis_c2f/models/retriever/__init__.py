"""Stage-1 retriever: T-MASS + UCoFiA-style scoring (registers ``c2f_tmass_retriever``).

``load_tmass_checkpoint`` reads an official T-MASS checkpoint into it (see
:mod:`lavis_c2f.models.retriever.tmass_checkpoint`).
"""
from lavis_c2f.models.retriever.embeddings import TextEmbedding, VideoEmbedding  # noqa: F401
from lavis_c2f.models.retriever.tmass import C2FTMassRetriever, MeanPoolingBaseline, load_tmass_checkpoint  # noqa: F401
