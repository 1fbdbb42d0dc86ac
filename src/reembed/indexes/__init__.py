"""The index stage: committed shards -> a FAISS index and a versioned Qdrant collection, built in parallel.

* :mod:`reembed.indexes.build` - runs both backends as Ray tasks and records progress.
* :mod:`reembed.indexes.faiss` - choose, train, fill, tune, write and load FAISS indexes; ``Searcher``.
* :mod:`reembed.indexes.qdrant` - the one ``connect()`` and ``point_id()``; versioned collections, bulk
  loading, alias swap and rollback.
"""
