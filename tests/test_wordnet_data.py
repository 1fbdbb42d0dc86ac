"""The shipped WordNet extract (tests/data): what bench/make_wordnet_extract.py promises about it."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

DATA = Path(__file__).parent / "data"


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_glosses_are_real_wordnet_synsets_with_their_metadata():
    glosses = load("wordnet_glosses.jsonl")
    assert len(glosses) == 4000 and len({g["id"] for g in glosses}) == 4000
    for g in glosses:
        assert re.fullmatch(r"\d{8}-[nvar]", g["id"]) and g["pos"] == g["id"][-1]
        assert len(g["text"].split()) >= 4 and '; "' not in g["text"]  # the definition, without its quoted examples
        assert g["lemmas"] and g["lexname"].split(".")[0] in {"noun", "verb", "adj", "adv"}
    assert Counter(g["pos"] for g in glosses)["n"] > 2000  # sampled across the whole of WordNet: mostly nouns
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (DATA / "WORDNET-LICENSE").read_text()


def test_each_query_is_a_lemma_naming_exactly_one_synset_not_in_its_own_definition():
    glosses = {g["id"]: g for g in load("wordnet_glosses.jsonl")}
    queries = load("wordnet_queries.jsonl")
    assert len(queries) == 300 and len({q["relevant"][0] for q in queries}) == 300
    owners = Counter(lemma.lower() for g in glosses.values() for lemma in g["lemmas"])
    for q in queries:
        (target,) = q["relevant"]
        g = glosses[target]
        assert q["query"] in g["lemmas"] and owners[q["query"].lower()] == 1
        assert q["query"].lower() not in g["text"].lower()
