"""Regenerate tests/data/wordnet_glosses.jsonl, wordnet_queries.jsonl and WORDNET-LICENSE from Debian's
``wordnet-base`` package (WordNet 3.0, Princeton; its license allows redistribution with its notice).

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python bench/make_wordnet_extract.py /tmp/wn            # writes into tests/data/

The extract is deterministic: the same Debian files give byte-identical outputs.

* **Glosses**: ``GLOSSES`` synsets, the first by ``sha256("wordnet:" + id)`` over every synset of
  data.noun / data.verb / data.adj / data.adv whose definition has at least 4 words. One JSON line each:
  ``{"id": "00004475-n", "text": definition, "lemmas": [...], "pos": "n", "lexname": "noun.Tops"}``; the id is
  the synset offset and its data file's part of speech (adjective satellites are ``a``); the text is the gloss's
  definition, without its quoted examples (which usually contain the lemma).
* **Queries** (a reverse dictionary): ``QUERIES`` lemmas, each naming exactly one synset of the extract,
  single words of letters only (4+ characters), that occur neither in their synset's definition nor as the stem
  of one of its words; ``{"query": lemma, "relevant": [synset id]}``, chosen by ``sha256("query:" + id)``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from pathlib import Path

GLOSSES = 4000
QUERIES = 300
FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
WORDNET = "usr/share/wordnet"
LEXNAMES_MAN = "usr/share/man/man5/lexnames.5WN.gz"
COPYRIGHT = "usr/share/doc/wordnet-base/copyright"
OUT = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="the folder wordnet-base was extracted into (dpkg -x DEB ROOT)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lexnames = read_lexnames(args.root / LEXNAMES_MAN)
    synsets = [s for pos, name in FILES.items() for s in read_data(args.root / WORDNET / name, pos, lexnames)]
    chosen = sorted((s for s in synsets if len(s["text"].split()) >= 4), key=lambda s: digest("wordnet", s["id"]))
    chosen = sorted(chosen[:GLOSSES], key=lambda s: s["id"])
    queries = pick_queries(chosen)
    args.out.mkdir(parents=True, exist_ok=True)
    write_lines(args.out / "wordnet_glosses.jsonl", chosen)
    write_lines(args.out / "wordnet_queries.jsonl", queries)
    (args.out / "WORDNET-LICENSE").write_text(license_notice(args.root / COPYRIGHT))
    print(f"{len(chosen)} glosses, {len(queries)} queries -> {args.out}")


def read_lexnames(man_page: Path) -> dict[int, str]:
    """Lexicographer file number -> name (``03`` -> ``noun.Tops``), from the lexnames(5WN) man page."""
    text = gzip.decompress(man_page.read_bytes()).decode("latin-1")
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d\d)\s+((?:adj|adv|noun|verb)\.\w+)", text, re.M)}


def read_data(path: Path, pos: str, lexnames: dict[int, str]) -> list[dict]:
    """The synsets of one WordNet data file (wndb(5WN)): offset, lex file, words, and the gloss after ``|``."""
    out = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # the license header
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        offset, lex_filenum, n_words = fields[0], int(fields[1]), int(fields[3], 16)
        words = [fields[4 + 2 * i] for i in range(n_words)]
        lemmas = list(dict.fromkeys(re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in words))
        out.append({"id": f"{offset}-{pos}", "text": definition(gloss), "lemmas": lemmas, "pos": pos,
                    "lexname": lexnames[lex_filenum]})
    return out


def definition(gloss: str) -> str:
    """The gloss without its quoted examples: ``a dog; "the dog barked"`` -> ``a dog``."""
    parts = [p.strip() for p in gloss.strip().split(";")]
    kept = [p for p in parts if p and not p.startswith('"')]
    return "; ".join(kept).strip()


def pick_queries(chosen: list[dict]) -> list[dict]:
    owners: dict[str, list[str]] = {}
    for s in chosen:
        for lemma in s["lemmas"]:
            owners.setdefault(lemma.lower(), []).append(s["id"])
    candidates = []
    for s in chosen:
        words = set(re.findall(r"[a-z]+", s["text"].lower()))
        for lemma in s["lemmas"]:
            low = lemma.lower()
            if (re.fullmatch(r"[a-z]{4,}", low) and len(owners[low]) == 1 and low not in s["text"].lower()
                    and not any(w[:4] == low[:4] for w in words if len(w) >= 4)):
                candidates.append({"query": lemma, "relevant": [s["id"]]})
                break  # one query per synset
    candidates.sort(key=lambda q: digest("query", q["relevant"][0]))
    return sorted(candidates[:QUERIES], key=lambda q: q["relevant"][0])


def license_notice(copyright_file: Path) -> str:
    """The WordNet 3.0 license as Debian ships it (the ``License: WordNet3.0`` paragraph), with its source."""
    text = copyright_file.read_text()
    body = text.split("License: WordNet3.0", 1)[1].split("\nFiles:", 1)[0]
    lines = [line[1:] if line.startswith(" ") else line for line in body.strip("\n").splitlines()]
    lines = ["" if line == "." else line for line in lines]
    return ("wordnet_glosses.jsonl and wordnet_queries.jsonl are extracted from WordNet 3.0 (Debian package\n"
            "wordnet-base) by bench/make_wordnet_extract.py. WordNet's license:\n\n" + "\n".join(lines).rstrip() + "\n")


def digest(salt: str, key: str) -> str:
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


if __name__ == "__main__":
    main()
