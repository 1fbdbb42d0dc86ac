"""Apps as their teams write them, on embedded Qdrant: a LangChain ``QdrantVectorStore`` app and a LlamaIndex
``QdrantVectorStore`` app, each built on the labelled test corpus (tests/data/migrate_corpus.jsonl) with a
real sentence-transformers model, and each given its query model as the only thing that changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from migrate_fixtures import corpus

COLLECTION = "documents"


def st_model(path: str | Path):
    from sentence_transformers import SentenceTransformer

    return _MODELS.setdefault(str(path), SentenceTransformer(str(path), device="cpu"))


_MODELS: dict[str, Any] = {}


def langchain_embeddings(path: str | Path):
    from langchain_core.embeddings import Embeddings

    class SentenceTransformerEmbeddings(Embeddings):
        def __init__(self, model):
            self.model = model

        def embed_documents(self, texts):
            return self.model.encode(list(texts), normalize_embeddings=True).tolist()

        def embed_query(self, text):
            return self.embed_documents([text])[0]

    return SentenceTransformerEmbeddings(st_model(path))


def llamaindex_embeddings(path: str | Path):
    from llama_index.core.embeddings import BaseEmbedding

    model = st_model(path)

    class SentenceTransformerEmbedding(BaseEmbedding):
        def _get_query_embedding(self, query: str):
            return model.encode([query], normalize_embeddings=True)[0].tolist()

        def _get_text_embedding(self, text: str):
            return model.encode([text], normalize_embeddings=True)[0].tolist()

        def _get_text_embeddings(self, texts):
            return model.encode(list(texts), normalize_embeddings=True).tolist()

        async def _aget_query_embedding(self, query: str):
            return self._get_query_embedding(query)

    return SentenceTransformerEmbedding(model_name=str(path))


# ---------------------------------------------------------------------------------------------------
# LangChain


def build_langchain_app(folder: Path, model: Path) -> list[str]:
    """The app's store, as LangChain's docs build it: documents with metadata, uuid4 point ids. Returns the
    ids LangChain gave the documents (in corpus order)."""
    from langchain_core.documents import Document
    from langchain_qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(folder))
    try:
        dim = st_model(model).get_embedding_dimension()
        client.create_collection(COLLECTION, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
        store = QdrantVectorStore(client=client, collection_name=COLLECTION, embedding=langchain_embeddings(model))
        docs = [Document(page_content=d["text"], metadata={"doc_id": d["id"], "topic": d["topic"], "tags": [d["topic"], "v1"]})
                for d in corpus()]
        return store.add_documents(docs)
    finally:
        client.close()


def langchain_answers(folder: Path, model: Path, ids: list[str]) -> dict[str, Any]:
    """What the app's own code gets: a search, a search filtered on metadata, documents by id."""
    from langchain_qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(folder))
    try:
        store = QdrantVectorStore(client=client, collection_name=COLLECTION, embedding=langchain_embeddings(model))
        top = store.similarity_search("how do I make bread rise", k=3)
        only = models.Filter(must=[models.FieldCondition(key="metadata.topic", match=models.MatchValue(value="astro"))])
        filtered = store.similarity_search("cooking food in the kitchen", k=5, filter=only)
        by_id = store.get_by_ids(ids[:3])
        return {"top": [(d.page_content, d.metadata["doc_id"], d.metadata["tags"]) for d in top],
                "filtered": [d.metadata["topic"] for d in filtered],
                "by_id": sorted((d.metadata["_id"], d.metadata["doc_id"], d.page_content) for d in by_id)}
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------
# LlamaIndex


def build_llamaindex_app(folder: Path, model: Path) -> list[str]:
    """A VectorStoreIndex over TextNodes (metadata source_id, topic) in a LlamaIndex QdrantVectorStore;
    returns the node ids."""
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(folder))
    try:
        nodes = [TextNode(text=d["text"], metadata={"source_id": d["id"], "topic": d["topic"]}) for d in corpus()]
        store = QdrantVectorStore(client=client, collection_name=COLLECTION)
        VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                         embed_model=llamaindex_embeddings(model))
        return [n.node_id for n in nodes]
    finally:
        client.close()


def llamaindex_answers(folder: Path, model: Path, ids: list[str]) -> dict[str, Any]:
    from llama_index.core import VectorStoreIndex
    from llama_index.core.vector_stores import ExactMatchFilter, MetadataFilters
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(folder))
    try:
        store = QdrantVectorStore(client=client, collection_name=COLLECTION)
        index = VectorStoreIndex.from_vector_store(store, embed_model=llamaindex_embeddings(model))
        top = index.as_retriever(similarity_top_k=3).retrieve("how do I make bread rise")
        only = MetadataFilters(filters=[ExactMatchFilter(key="topic", value="astro")])
        filtered = index.as_retriever(similarity_top_k=5, filters=only).retrieve("cooking food in the kitchen")
        by_id = store.get_nodes(node_ids=ids[:3])
        return {"top": [(n.node.get_content(), n.node.metadata["source_id"]) for n in top],
                "filtered": [n.node.metadata["topic"] for n in filtered],
                "by_id": sorted((n.node_id, n.metadata["source_id"], n.get_content()) for n in by_id)}
    finally:
        client.close()
