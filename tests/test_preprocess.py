"""`mixtral-run preprocess`: every input format through the CLI, read back and decoded; bad input is a clear error."""

from __future__ import annotations

import json
import sys

import pytest

from mixtral.cli import main
from mixtral.data.indexed import IndexedDataset
from mixtral.data.tokenizer import load_tokenizer

TOK = load_tokenizer(None)


def decoded(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds.document(d).tolist() for d in range(ds.num_documents)]


def test_text_paragraph_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("First line\nsame document.\n\n  \t\nSecond doc.\n\n\n\nThird: ünïcode ✓\n")
    assert main(["preprocess", "--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "out")]) == 0
    expected = ["First line\nsame document.", "Second doc.", "Third: ünïcode ✓"]
    assert decoded(tmp_path / "out") == [TOK.encode(t) for t in expected]
    assert IndexedDataset(tmp_path / "out").dtype.name == "uint16"


def test_jsonl_text_key_eos_and_workers_agree(tmp_path):
    rows = [{"body": f"Document number {i} says {'hello ' * i}", "id": i} for i in range(600)]
    rows[3]["body"] = "   "  # empty documents are skipped
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for workers in ("1", "2"):
        args = ["preprocess", "--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / f"w{workers}"),
                "--text-key", "body", "--append-eos", "--workers", workers]
        assert main(args) == 0
    docs = decoded(tmp_path / "w1")
    kept = [r["body"] for r in rows if r["body"].strip()]
    assert docs == [TOK.encode(t, bos=True, eos=True) for t in kept]
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


def test_several_inputs_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n")
    main(["preprocess", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--output-prefix",
          str(tmp_path / "o")])
    assert [TOK.decode(d) for d in decoded(tmp_path / "o")] == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_alpaca_records(tmp_path, layout):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    path = tmp_path / f"a.{layout}"
    path.write_text(json.dumps(records) if layout == "json" else "\n".join(map(json.dumps, records)))
    main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"), "--format", "alpaca"])
    assert [TOK.decode(d) for d in decoded(tmp_path / "o")] == [
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
        "### Instruction:\nSay hi.\n\n### Response:\nHi!"]


def run_error(capsys, args: list[str]) -> str:
    assert main(["preprocess", *args]) == 2
    return capsys.readouterr().err


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    out = ["--output-prefix", str(tmp_path / "o")]
    assert "does not exist" in run_error(capsys, ["--input", str(tmp_path / "nope.txt"), *out])
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    err = run_error(capsys, ["--input", str(tmp_path / "d.jsonl"), *out, "--format", "csv"])
    assert "unknown --format 'csv'" in err and "alpaca" in err
    err = run_error(capsys, ["--input", str(tmp_path / "d.jsonl"), *out])
    assert "d.jsonl:1: no key 'text' (found: content); pass the right --text-key" in err
    err = run_error(capsys, ["--input", str(tmp_path / "d.jsonl"), *out, "--format", "alpaca"])
    assert "no key 'instruction'" in err
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert "not valid JSON lines" in run_error(capsys, ["--input", str(tmp_path / "bad.jsonl"), *out])
    assert not list(tmp_path.glob("o*"))


def test_missing_key_from_a_worker_process(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "ok"}) + "\n" for _ in range(300)) + "{}\n")
    err = run_error(capsys, ["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "o"),
                             "--workers", "2"])
    assert "d.jsonl:301: no key 'text'" in err
    assert not list(tmp_path.glob("o*"))


def test_parquet_without_pyarrow_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    err = run_error(capsys, ["--input", str(tmp_path / "d.parquet"), "--output-prefix", str(tmp_path / "o")])
    assert "pip install pyarrow" in err
