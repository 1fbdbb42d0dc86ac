"""The drift adapter: fitting, judging, saving next to the output, refusing other models, the query path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from migrate_fixtures import model_info, write_export, write_output
from migrate_fixtures import proj, space  # noqa: F401  (fixtures)
from reembed import adapter as A
from reembed.storage import Location


def drifted_pair(n: int = 2000, d_old: int = 48, d_new: int = 64, clusters: int = 40, seed: int = 0):
    """Clustered documents seen by two models: the old space, and a new one that is a non-linear, noisy,
    higher-dimensional view of the same documents (as a new model is of the same texts)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d_old))
    old = centers[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d_old))
    mix = rng.standard_normal((d_old, d_new)) / np.sqrt(d_old)
    new = np.tanh(old @ mix) + 0.05 * rng.standard_normal((n, d_new))
    return A._normalize(new), A._normalize(old)


def test_each_kind_recovers_most_of_the_new_models_neighbours_and_shuffled_pairs_do_not():
    new, old = drifted_pair()
    ids = np.array([f"d{i}" for i in range(len(new))], dtype=object)
    train, test = slice(0, 1600), slice(1600, None)
    got = {}
    for kind in A.KINDS:
        a = A.fit(new[train], old[train], kind, rank=32)
        got[kind] = A.evaluate(a, new[test], old[test], ids[test])
        assert a.apply(new[:3]).shape == (3, old.shape[1])
        assert np.allclose(np.linalg.norm(a.apply(new[:3]), axis=1), 1.0, atol=1e-5)
    for kind, fig in got.items():
        assert fig["recall"]["new"] == 1.0  # neighbour overlap: the new model's own neighbours are the truth
        assert fig["recall"]["adapter"] >= 0.5, (kind, fig)  # far above chance (10/400)
        assert fig["recovery"] == fig["recall"]["adapter"]
    # pairs that do not belong together teach nothing: the same fit on shuffled pairs is near chance
    wrong = A.fit(new[train], old[train][np.random.default_rng(1).permutation(1600)], "lowrank", rank=32)
    assert A.evaluate(wrong, new[test], old[test], ids[test])["recall"]["adapter"] < 0.15


def test_labelled_queries_are_scored_against_their_labels():
    new, old = drifted_pair(n=600, seed=2)
    ids = np.array([f"d{i}" for i in range(600)], dtype=object)
    a = A.fit(new, old, "procrustes")
    # each query is a perturbed document; its label is that document
    rng = np.random.default_rng(5)
    pick = rng.choice(600, 50, replace=False)
    q_new = A._normalize(new[pick] + 0.01 * rng.standard_normal((50, new.shape[1])))
    q_old = A._normalize(old[pick] + 0.01 * rng.standard_normal((50, old.shape[1])))
    fig = A.evaluate(a, new, old, ids, queries=(q_new, q_old, [{ids[i]: 1.0} for i in pick]))
    assert fig["recall"]["new"] == 1.0 and fig["recall"]["old"] == 1.0 and "50 labelled queries" in fig["basis"]
    assert 0.5 <= fig["recall"]["adapter"] <= 1.0 and fig["recovery"] == fig["recall"]["adapter"]
    broken = A.evaluate(a, new, old, ids, queries=(q_new, q_old, [{ids[(i + 1) % 600]: 1.0} for i in pick]))
    assert broken["recall"]["new"] < 0.3  # wrong labels are not silently scored as right


def test_settings_chosen_on_held_out_pairs_beat_the_least_regularised_fit_on_a_small_noisy_fit():
    """``fit(..., tune=True)`` picks each kind's settings on pairs held out of the fit (never the test
    documents): on 120 noisy pairs the chosen ridge beats the smallest one, the MLP stops early, and
    Procrustes centres both sides when the old space has a common offset."""
    new, old = drifted_pair(n=1000, seed=3)
    new = A._normalize(new + 0.1 * np.random.default_rng(4).standard_normal(new.shape))
    ids = np.array([f"d{i}" for i in range(1000)], dtype=object)
    tr, te = slice(0, 120), slice(500, None)

    def held_out(a):
        return A.evaluate(a, new[te], old[te], ids[te])["recall"]["adapter"]

    tuned = A.fit(new[tr], old[tr], "lowrank", tune=True)
    tuning = tuned.figures["tuning"]
    assert tuning["held_out_pairs"] == 12 and len(tuning["tried"]) == len(A.RIDGES) * 2  # ranks 32 and 48 (full)
    assert not tuning["chosen"].startswith("ridge=0.001,")
    least = A.Adapter("lowrank", A._lowrank(new[tr], old[tr], old.shape[1], ridge=min(A.RIDGES)))
    assert held_out(tuned) >= held_out(least) + 0.01, (held_out(tuned), held_out(least), tuning["chosen"])

    # the residual MLP stops once the held-out pairs stop improving: on pairs that teach nothing, at once
    wrong = old[tr][np.random.default_rng(1).permutation(120)]
    mlp = A.fit(new[tr], wrong, "mlp", epochs=30, tune=True)
    stopped = int(mlp.figures["tuning"]["chosen"].split("epochs=")[1])
    assert stopped < 10 and set(mlp.weights) == {"W", "W1", "b1", "W2", "b2"}

    shifted = A._normalize(old + 0.8 * A._normalize(np.ones((1, old.shape[1]))))
    pro = A.fit(new[tr], shifted[tr], "procrustes", tune=True)
    assert pro.figures["tuning"]["chosen"] == "centre=True" and "b" in pro.weights
    plain = A.fit(new[tr], shifted[tr], "procrustes")
    assert (A.evaluate(pro, new[te], shifted[te], ids[te])["recall"]["adapter"]
            > A.evaluate(plain, new[te], shifted[te], ids[te])["recall"]["adapter"])


@pytest.mark.ray
def test_fit_from_an_output_and_its_export_saves_a_versioned_checked_adapter(tmp_path, ray_local, capsys):
    from reembed.cli import main

    new, old = drifted_pair(n=400, seed=3)
    ids = [f"doc-{i}" for i in range(400)]
    out = write_output(tmp_path / "out", ids, new, model_info("new-model", new.shape[1]), shard_rows=50)
    export = write_export(tmp_path / "export", ids, [f"text {i}" for i in range(400)], old)
    report = A.fit_output(out, old=str(export), old_model="old-model", sample=300, rank=16)
    assert report["pairs"] == 300 and report["held_out"] == 60 and report["version"] == 1
    assert report["chosen"] in A.KINDS and report["kinds"][report["chosen"]]["recall"]["adapter"] >= 0.5
    loaded = A.load_adapter(out)
    assert loaded.version == 1 and loaded.kind == report["chosen"] and loaded.old_model["name"] == "old-model"
    assert loaded.apply(new[:5]).shape == (5, old.shape[1]) and loaded.figures == report["kinds"][report["chosen"]]
    loaded.check(model_info("new-model", new.shape[1])["fingerprint"], A.old_fingerprint("old-model", old.shape[1]))
    with pytest.raises(A.AdapterError, match="fitted for the new model new-model"):
        loaded.check(model_info("another-model", new.shape[1])["fingerprint"])
    with pytest.raises(A.AdapterError, match="fitted for the old model old-model"):
        loaded.check(None, A.old_fingerprint("some-other-old-model", old.shape[1]))

    # a second fit takes the next version; the first stays
    assert main(["adapter", "fit", str(tmp_path / "out"), "--old", str(export), "--old-model", "old-model",
                 "--sample", "300", "--kinds", "procrustes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2 and A.versions(out) == [1, 2]
    assert main(["adapter", "show", str(tmp_path / "out"), "--version", "1"]) == 0
    assert "adapter v1" in capsys.readouterr().out

    # damaged weights and a record that points outside the output are refused in one line
    meta = json.loads((tmp_path / "out" / "adapters" / "v0002.json").read_text())
    weights = tmp_path / "out" / "adapters" / meta["weights"]
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    assert main(["adapter", "show", str(tmp_path / "out")]) == 1
    assert "sha256 does not match" in capsys.readouterr().err
    meta["weights"] = "../../../etc/passwd"
    (tmp_path / "out" / "adapters" / "v0003.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="outside|\\.\\."):
        A.load_adapter(out, 3)


def test_too_few_pairs_and_no_old_side_are_one_line_errors(tmp_path):
    new, old = drifted_pair(n=40, seed=4)
    ids = [f"doc-{i}" for i in range(40)]
    out = write_output(tmp_path / "out", ids, new, model_info("new-model", new.shape[1]), shard_rows=20)
    with pytest.raises(A.AdapterError, match="carry no old_embedding column; pass the old store"):
        A.fit_output(out)
    with pytest.raises(A.AdapterError, match="unknown adapter kind 'linear'"):
        A.fit_output(out, kinds=["linear"])
    with pytest.raises(A.AdapterError, match="no adapter here"):
        A.load_adapter(Location.from_uri(str(tmp_path / "out")))


def test_query_through_the_adapter_embeds_once_and_searches_both_stores(tmp_path, space, proj, minilm, capsys):
    """`reembed query --adapter`: the new output's adapter (fitted on MiniLM -> its 1024-d projection) maps
    the query into the old store's space; hits come from both stores, and another old model is refused."""
    from migrate_fixtures import queries
    from reembed.cli import main

    out = write_output(tmp_path / "new", space["ids"], space["new"], model_info(proj, 1024), columns={"text": space["texts"]})
    export = write_export(tmp_path / "export", space["ids"], space["texts"], space["old"])
    report = A.fit_output(out, old=str(export), old_model=str(minilm), kinds=["procrustes"], sample=60)
    assert report["kinds"]["procrustes"]["recall"]["adapter"] > 0.5  # a linear map of the old space: recovered
    text = queries()[0]["query"]
    assert main(["query", text, "--old", str(export), "--new", str(tmp_path / "new"), "--adapter", "--json",
                 "--old-model", str(minilm)]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 10 and any("old" in h["ranks"] for h in hits) and any("new" in h["ranks"] for h in hits)
    assert main(["query", text, "--old", str(export), "--new", str(tmp_path / "new"), "--adapter",
                 "--old-model", str(proj)]) == 1
    assert "fitted for the old model" in capsys.readouterr().err


def underweighted_pair(n: int, d: int = 32, seed: int = 0):
    """Two models that see the same latent directions, but the old one under-weights half of them (x 0.15):
    its nearest neighbours follow the other half, the new model's follow all of them. A map that reproduces
    the old vector inherits the old ranking; the old vectors still hold every direction, so a map that
    targets the new model's ranking can re-weight them (the new model's ranking is reachable)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d))
    weight = np.where(np.arange(d) < d // 2, 1.0, 0.15)
    rotation = np.linalg.qr(np.random.default_rng(99).standard_normal((d, d)))[0]  # the same new model for every call
    return A._normalize(z @ rotation), A._normalize(z * weight)


def test_the_ranking_loss_keeps_more_of_the_new_models_neighbours_than_the_vector_loss():
    """``listwise`` (KL between the new model's and the adapted query's softmax over the fit documents)
    against the vector-loss kinds, on query-like pairs and unseen documents: it keeps clearly more of the
    new model's top-10, where reproducing the old vector cannot."""
    new, old = underweighted_pair(1000)
    q_new, q_old = underweighted_pair(900, seed=1)
    docs, unseen = slice(0, 600), slice(600, None)
    got = {}
    for kind in ("procrustes", "lowrank", "listwise"):
        a = A.fit(new[docs], old[docs], kind, rank=32, queries=(q_new[:600], q_old[:600]), epochs=30)
        got[kind] = A.query_overlap(a, q_new[600:], new[unseen], old[unseen])
    assert set(A.fit(new[:50], old[:50], "listwise", epochs=1).weights) == {"W", "b", "W1", "b1", "W2", "b2"}
    assert set(A.fit(new[:50], old[:50], "listwise", epochs=1, hidden=0).weights) == {"W", "b"}
    assert got["listwise"] >= max(got["procrustes"], got["lowrank"]) + 0.05, got
    assert A.Adapter("listwise", A._listwise(new[docs], old[docs], q_new[:0], q_old[:0], epochs=0)).apply(
        new[:2]).shape == (2, old.shape[1])  # no query log: the documents are the queries


def test_the_listwise_residual_layer_learns_a_ranking_no_affine_map_reproduces():
    """The old model reverses the coordinates of a text whose first one is negative: the query map must
    depend on that sign, which an affine map cannot do and the residual ReLU layer can. The layer starts at
    zero (epoch 0 is the Procrustes map) and ends clearly ahead on unseen queries and documents."""
    def pair(n, seed, d=12):
        z = np.random.default_rng(seed).standard_normal((n, d))
        return A._normalize(z).astype(np.float32), A._normalize(np.where(z[:, :1] > 0, z, z[:, ::-1])).astype(np.float32)

    new, old = pair(1000, 0)
    q_new, q_old = pair(1500, 1)
    got = {h: A.query_overlap(A.Adapter("listwise", A._listwise(new[:600], old[:600], q_new[:1200], q_old[:1200],
                                                                 epochs=30, hidden=h)),
                              q_new[1200:], new[600:], old[600:]) for h in (0, 256)}
    assert got[256] >= got[0] + 0.08, got
    start = A.Adapter("listwise", A._listwise(new[:600], old[:600], q_new[:0], q_old[:0], epochs=0, hidden=256))
    assert np.allclose(start.apply(new[:5]), A._normalize(new[:5] @ A._procrustes(new[:600], old[:600])), atol=1e-5)


def test_tuned_listwise_and_query_pairs_are_judged_on_held_out_queries():
    new, old = underweighted_pair(400, seed=2)
    q_new, q_old = underweighted_pair(300, seed=3)
    a = A.fit(new, old, "listwise", tune=True, queries=(q_new, q_old))
    tuning = a.figures["tuning"]
    assert tuning["basis"] == "held-out queries" and tuning["held_out_queries"] == 30
    assert len(tuning["tried"]) == len(A.LISTWISE_GRID) and tuning["chosen"].startswith("temperature=")
    pro = A.fit(new, old, "procrustes", tune=True, queries=(q_new, q_old))
    assert pro.figures["tuning"]["basis"] == "held-out queries"
    with pytest.raises(A.AdapterError, match="query pairs must be"):
        A.fit(new, old, "procrustes", queries=(q_new, q_old[:10]))


def test_query_log_reading_lines_and_json_lines_and_bad_files_in_one_line(tmp_path):
    plain = tmp_path / "log.txt"
    plain.write_text("cheap flights\n\n  hotel paris \ncheap flights\nweather\n")
    assert A.read_query_log(str(plain)) == ["cheap flights", "hotel paris", "weather"]  # distinct, blank lines skipped
    assert A.read_query_log(str(plain), limit=2) == ["cheap flights", "hotel paris"]
    jl = tmp_path / "log.jsonl"
    jl.write_text('{"text": "dog", "ts": 1}\n{"text": "cat"}\n')
    assert A.read_query_log(str(jl)) == ["dog", "cat"]
    cases = {"missing.txt": (None, "no such query log"),
             "empty.txt": ("\n\n", "no queries in this query log"),
             "broken.jsonl": ('{"text": "dog"}\n{"text": "ca\n', "broken.jsonl:2: not valid JSON"),
             "notext.jsonl": ('{"text": "dog"}\n{"query": "cat"}\n', 'notext.jsonl:2: "text" must be a non-empty'),
             "binary.txt": (b"\xff\xfe\x00bad", "not UTF-8 text")}
    for name, (body, message) in cases.items():
        if body is not None:
            (tmp_path / name).write_bytes(body if isinstance(body, bytes) else body.encode())
        with pytest.raises(A.AdapterError, match=message):
            A.read_query_log(str(tmp_path / name))


def test_fit_with_a_query_log_embeds_it_with_both_models(tmp_path, space, proj, minilm, capsys):
    """`reembed adapter fit --query-log`: the log's texts are embedded by the output's model (MiniLM's
    1024-d projection) and by --old-model (MiniLM), and join the fit; a bad log is one line, exit 1."""
    from reembed.cli import main

    out = write_output(tmp_path / "new", space["ids"], space["new"], model_info(proj, 1024))
    export = write_export(tmp_path / "export", space["ids"], space["texts"], space["old"])
    log_file = tmp_path / "queries.jsonl"
    log_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["cheap flights", "a recipe", "tax forms",
                                                                          "how do vaccines work", "football scores"] * 5))
    args = ["adapter", "fit", str(tmp_path / "new"), "--old", str(export), "--old-model", str(minilm),
            "--sample", "60", "--kinds", "procrustes,listwise", "--no-save"]
    assert main(args + ["--query-log", str(log_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["query_pairs"] == 5 and set(report["kinds"]) == {"procrustes", "listwise"}
    assert report["kinds"]["procrustes"]["recall"]["adapter"] > 0.5  # the old space, linearly projected: recovered
    assert main(args[:-3] + ["--kinds", "procrustes", "--no-save", "--query-log", str(log_file)]) == 0
    assert "5 query-log pairs" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    assert main(args + ["--query-log", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'bad.jsonl:2: "text" must be a non-empty string' in err
    assert main(args[:5] + args[7:] + ["--query-log", str(log_file)]) == 1
    assert "--query-log needs --old-model" in capsys.readouterr().err
