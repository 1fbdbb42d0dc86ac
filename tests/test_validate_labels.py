"""Labelled queries that name the app's own ids (validation/queries.py relabel) and the A/B gate that fails
when it cannot measure (validation/gates.py label_coverage)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from migrate_fixtures import model_info, write_output
from reembed.errors import ValidationError
from reembed.validation.gates import FAIL, PASS, label_coverage
from reembed.validation.queries import LabelledQuery, relabel


@pytest.fixture
def output(tmp_path):
    ids = ["u1", "u2", "u3", "u4"]
    docs = ["d1", "d2", "d3", "d3"]  # u3 and u4: two chunks of one document
    payloads = [json.dumps({"page_content": f"t{i}", "metadata": {"doc_id": d}}) for i, d in enumerate(docs)]
    return write_output(tmp_path / "out", ids, np.eye(4), model_info("m", 4), shard_rows=3,
                        columns={"_payload": payloads, "_point_id": ["11", "12", "13", "14"],
                                 "meta": [json.dumps({"src": s}) for s in "abcd"], "topic": list("wxyz")})


def test_labels_naming_app_ids_are_rewritten_to_output_ids(output):
    labelled = [LabelledQuery("q1", {"d1": 1.0}), LabelledQuery("q2", {"d3": 2.0, "nowhere": 1.0})]
    got = relabel(labelled, output, "metadata.doc_id")
    assert [q.relevant for q in got] == [{"u1": 1.0}, {"u3": 2.0, "u4": 2.0, "nowhere": 1.0}]
    assert [q.query for q in got] == ["q1", "q2"]
    assert relabel([LabelledQuery("q", {"12": 1.0})], output, "point_id")[0].relevant == {"u2": 1.0}
    assert relabel([LabelledQuery("q", {"c": 1.0})], output, "meta.src")[0].relevant == {"u3": 1.0}  # a JSON column
    assert relabel([LabelledQuery("q", {"z": 1.0})], output, "topic")[0].relevant == {"u4": 1.0}


def test_a_label_field_the_output_lacks_is_one_clear_error(tmp_path):
    out = write_output(tmp_path / "out", ["a"], np.eye(1, 4), model_info("m", 4), columns={"text": ["x"]})
    with pytest.raises(ValidationError, match="--label-id-field metadata.doc_id: the output has no such field"):
        relabel([LabelledQuery("q", {"d": 1.0})], out, "metadata.doc_id")


def test_the_ab_gate_fails_when_most_labels_are_not_in_the_output():
    gate = {"status": PASS, "message": "new recall@10=0.000 vs old recall@10=0.000"}
    failed = label_coverage(gate, ["d1", "d2", "d3"], 4, ["5f1c-uuid", "a2b3-uuid"], ["text", "_payload", "_point_id"])
    assert failed["status"] == FAIL and failed["unknown_relevant"] == 3
    assert "cannot measure: 75% of the labelled ids are not in the output" in failed["message"]
    assert "--label-id-field" in failed["message"] and "point_id" in failed["message"] and "5f1c-uuid" in failed["message"]
    few = label_coverage(gate, ["d1"], 4, ["u1"], [])
    assert few["status"] == PASS and "1 of 4 labelled ids are not in the output" in few["message"]
    assert label_coverage(gate, [], 4, ["u1"], []) is gate
