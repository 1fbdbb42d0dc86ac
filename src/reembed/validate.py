"""Transitional: the validation gate lives in :mod:`reembed.validation`.

``reembed.migrate`` still imports these names from here (``exact_knn``, ``read_faiss``, ``text_embedder``,
...). Remove this module once it imports them from :mod:`reembed.validation` / :mod:`reembed.indexes.search`:
as a submodule named ``validate`` it would replace the public ``reembed.validate`` function on the package.
"""

from reembed.validation import *  # noqa: F401,F403
from reembed.validation import (REPORT_HTML, REPORT_JSON, _json_default, _normalize, check_validation,  # noqa: F401
                                exact_knn, faiss_searcher, qdrant_searcher, read_faiss, read_ids, text_embedder,
                                validate, ValidationError, Settings, LabelledQuery, Pair)
