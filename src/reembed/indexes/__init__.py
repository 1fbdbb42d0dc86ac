"""The index stage: committed shards -> a FAISS index and a versioned Qdrant collection, built in parallel.

* :mod:`reembed.indexes.build` - runs both backends as Ray tasks and records progress.
* :mod:`reembed.indexes.faiss` - choose, train, fill, tune, write and read FAISS indexes (the one reader,
  for a manifest-recorded index and for a file a user names).
* :mod:`reembed.indexes.exact` - the one exact kNN and recall, used by the tuning and the validation gate.
* :mod:`reembed.indexes.qdrant` - the one ``connect()`` and ``point_id()``; versioned collections, bulk
  loading, alias swap and rollback.

* :mod:`reembed.indexes.progress` - per-shard progress records of a build (create-only, O(1) each).

Searching an output by text is :mod:`reembed.indexes.search`.
"""
