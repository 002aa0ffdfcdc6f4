"""colbert-triton: ColBERT late-interaction retrieval on hand-written Triton kernels.

    from colbert_triton import ColBERT
    model = ColBERT.from_pretrained("answerdotai/answerai-colbert-small-v1")
    queries = model.encode_queries(["..."])
    corpus = model.encode_documents(texts, packed=True)
    scores, indices = model.search(queries, corpus, k=10)
    model.save_embeddings("corpus.safetensors", corpus)   # later: model.load_embeddings(...)
"""

from .model.checkpoint import CheckpointError, ColBERTSettings
from .model.colbert import ColBERT
from .model.pooling import PoolingProcesses
from .packed import EmbeddingsFile, PackedEmbeddings, load_embeddings, save_embeddings
from .scoring import rerank, score, score_candidates, score_pairwise, search

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ColBERT",
    "ColBERTSettings",
    "EmbeddingsFile",
    "PackedEmbeddings",
    "PoolingProcesses",
    "load_embeddings",
    "rerank",
    "save_embeddings",
    "score",
    "score_candidates",
    "score_pairwise",
    "search",
]
