"""The committed self-distillation store: round trip, append-only growth, manifest,
backbone refusal, and the real committed files against their manifest."""

from __future__ import annotations

import json
import lzma

import pytest

from medusa_vllm.training.store import (
    STORE_DIR,
    BackboneMismatch,
    DistillStore,
    Generator,
    StoreError,
    file_sha256,
    prompt_key,
)


def gen(**kw) -> Generator:
    base = {"model": "m", "backbone_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
    return Generator(**{**base, **kw})


def row(text: str, n: int = 3) -> dict:
    messages = [{"role": "user", "content": text}]
    return {"key": prompt_key(messages), "messages": messages, "prompt_token_ids": [1, 2, 3],
            "response_token_ids": list(range(5, 5 + n)), "finish_reason": "stop",
            "meta": {"kind": "question"}}


def test_round_trip_and_manifest(tmp_path):
    store = DistillStore(tmp_path)
    rows = [row("What is rain?"), row("List three birds.", 7)]
    entry = store.append("everyday-heldout", rows, gen(), "test", {"n": 2}, seconds=1.5)
    assert entry.name == "everyday-heldout-000.jsonl.xz"
    assert list(store.rows("everyday-heldout")) == rows
    m = json.loads((tmp_path / "manifest.json").read_text())
    (f,) = m["files"]
    assert (f["rows"], f["response_tokens"], f["recipe"]) == (2, 10, {"n": 2})
    assert f["sha256"] == file_sha256(tmp_path / f["name"])
    assert f["bytes"] == (tmp_path / f["name"]).stat().st_size
    assert f["generator"]["backbone_sha256"] == "a" * 64 and f["generator"]["max_tokens"] == 256
    assert (m["total_rows"], m["total_response_tokens"], m["total_bytes"]) == (2, 10, f["bytes"])
    assert store.verify() == {"everyday-heldout": 2}


def test_append_adds_a_file_and_keeps_the_old_ones(tmp_path):
    store = DistillStore(tmp_path)
    store.append("corpus-train", [row("a b c d")], gen(), "test")
    first = tmp_path / "corpus-train-000.jsonl.xz"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    store.append("corpus-train", [row("e f g h"), row("i j k l")], gen(), "test")
    store.append("everyday-train", [row("a b c d")], gen(), "test")  # other set: own numbering
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert [e.name for e in store.entries()] == [
        "corpus-train-000.jsonl.xz", "corpus-train-001.jsonl.xz", "everyday-train-000.jsonl.xz"]
    assert [r["messages"][0]["content"] for r in store.rows("corpus-train")] == [
        "a b c d", "e f g h", "i j k l"]
    assert store.verify() == {"corpus-train": 3, "everyday-train": 1}
    with pytest.raises(StoreError, match="already committed"):
        store.append("corpus-train", [row("e f g h")], gen(), "test")


def test_lookup_matches_generator_settings(tmp_path):
    store = DistillStore(tmp_path)
    r = row("What is rain?")
    store.append("s", [r], gen(), "test")
    assert store.lookup(gen(), [r["key"], "0" * 16]) == {r["key"]: r}
    assert store.lookup(gen(max_tokens=128), [r["key"]]) == {}  # other settings: not an answer
    assert store.lookup(gen(temperature=0.7), [r["key"]]) == {}
    assert store.lookup(gen(), [r["key"]], set_name="other") == {}


def test_other_backbone_is_refused(tmp_path):
    store = DistillStore(tmp_path)
    store.append("s", [row("What is rain?")], gen(), "test")
    with pytest.raises(BackboneMismatch, match="backbone_sha256.*only valid for the backbone"):
        store.lookup(gen(backbone_sha256="c" * 64), ["x"])
    with pytest.raises(BackboneMismatch, match="tokenizer_sha256"):
        store.append("s", [row("Other?")], gen(tokenizer_sha256="d" * 64), "test")


def test_corruption_is_detected(tmp_path):
    store = DistillStore(tmp_path)
    store.append("s", [row("What is rain?"), row("Why?  x y")], gen(), "test")
    path = tmp_path / "s-000.jsonl.xz"
    rows = lzma.decompress(path.read_bytes()).decode().splitlines()
    path.write_bytes(lzma.compress(("\n".join(rows[:1]) + "\n").encode()))
    with pytest.raises(StoreError, match="sha256 differs"):
        list(store.rows())
    (tmp_path / "stray-000.jsonl.xz").write_bytes(b"")
    with pytest.raises(StoreError):
        store.verify()


def test_bad_rows_are_refused(tmp_path):
    store = DistillStore(tmp_path)
    bad = row("What is rain?")
    bad["key"] = "f" * 16
    with pytest.raises(StoreError, match="not the key of its messages"):
        store.append("s", [bad], gen(), "test")
    empty = row("What is snow?")
    empty["response_token_ids"] = []
    with pytest.raises(StoreError, match="non-empty list"):
        store.append("s", [empty], gen(), "test")
    with pytest.raises(StoreError, match="set name"):
        store.append("Bad Name", [row("x y z w")], gen(), "test")
    assert not list(tmp_path.iterdir())


def test_committed_store_matches_its_manifest():
    """The files in medusa_vllm/assets/distill parse, match their sha256, counts and
    schema, share one backbone, and the held-out and train prompts are disjoint."""
    store = DistillStore(STORE_DIR)
    if not store.manifest_path.is_file():
        pytest.skip("no committed store in this checkout")
    counts = store.verify()
    assert counts and all(n > 0 for n in counts.values())
    entries = store.entries()
    assert len({e.generator["backbone_sha256"] for e in entries}) == 1
    for e in entries:
        assert e.generator["model"] == "SmolLM2-135M-Instruct"
        assert e.generator["dtype"] == "float32"
    train = {r["key"] for name in counts if name.endswith("-train") for r in store.rows(name)}
    for name in counts:
        if name.endswith("-heldout"):
            assert not {r["key"] for r in store.rows(name)} & train, name
    # the WordNet-topic requests share no topic word with the bench's everyday prompts
    if "topics-train" in counts:
        import re

        from medusa_vllm.tools.bench.prompts import EVERYDAY_PROMPTS

        bench = {w for p in EVERYDAY_PROMPTS for w in re.findall(r"[a-z]+", p.lower())}
        for name in ("topics-train", "topics-heldout"):
            rows = list(store.rows(name))
            assert rows and all(r["meta"]["source"].startswith("wordnet:") for r in rows)
            assert not {w for r in rows for w in r["meta"]["topic"].split()} & bench
        held_topics = {r["meta"]["topic"] for r in store.rows("topics-heldout")}
        assert not held_topics & {r["meta"]["topic"] for r in store.rows("topics-train")}


def test_generate_distill_data_reads_the_store_first(tmp_path, tiny, monkeypatch):
    """Committed answers are reused, only missing prompts reach the engine, new rows
    are appended as a new file; a store of another backbone is refused."""
    from medusa_vllm.tools.engine_proc import EngineResult
    from medusa_vllm.training import distill
    from medusa_vllm.training.config import TrainingError

    calls = []

    def fake_run(model, jobs, **kw):
        calls.append([j["messages"][0]["content"] for j in jobs])
        ids = [[7 + i, 8, 9] for i, _ in enumerate(jobs)]
        return EngineResult(token_ids=ids, texts=[""] * len(jobs), finish_reasons=["stop"] * len(jobs),
                            logprobs=[], refused=[], wall_s=0.0)

    monkeypatch.setattr(distill, "_run_generation", fake_run)
    store = DistillStore(tmp_path / "store")
    msgs = [[{"role": "user", "content": t}] for t in ("one", "two", "three")]
    kw = {"store": store, "store_set": "corpus-train", "verbose": False, "max_tokens": 8}
    distill.generate_distill_data(tiny, msgs[:2], tmp_path / "a.jsonl", **kw)
    distill.generate_distill_data(tiny, msgs, tmp_path / "b.jsonl", **kw)
    assert calls == [["one", "two"], ["three"]]
    assert [e.rows for e in store.entries()] == [2, 1]
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert b[:2] == a and [r["response_token_ids"] for r in b] == [[7, 8, 9], [8, 8, 9], [7, 8, 9]]
    distill.generate_distill_data(tiny, msgs, tmp_path / "c.jsonl", **kw)
    assert len(calls) == 2  # everything committed: no engine
    # other settings are other answers: generated again (not taken from the store)
    distill.generate_distill_data(tiny, msgs[:1], tmp_path / "d.jsonl", **{**kw, "max_tokens": 9})
    assert calls[-1] == ["one"]
    monkeypatch.setattr("medusa_vllm.training.store.backbone_hashes",
                        lambda d: {"backbone_sha256": "0" * 64, "tokenizer_sha256": "1" * 64})
    with pytest.raises(TrainingError, match="only valid for the backbone that wrote them"):
        distill.generate_distill_data(tiny, msgs, tmp_path / "e.jsonl", **kw)
