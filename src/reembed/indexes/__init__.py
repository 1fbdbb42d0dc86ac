"""The index stage: committed shards -> a FAISS index and a versioned Qdrant collection, built in parallel.

* :mod:`reembed.indexes.faiss_index` - choose, train, fill, tune, write and load FAISS indexes; ``Searcher``.
* :mod:`reembed.indexes.qdrant_index` - versioned collections, bulk loading, alias swap and rollback.
* :mod:`reembed.indexes.stage` - runs both as Ray tasks and records progress in the manifest.
* :mod:`reembed.indexes.commands` - ``reembed index | versions | swap | rollback | search``.
"""
