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
        args = [
            "preprocess",
            "--input",
            str(tmp_path / "d.jsonl"),
            "--output-prefix",
            str(tmp_path / f"w{workers}"),
            "--text-key",
            "body",
            "--append-eos",
            "--workers",
            workers,
        ]
        assert main(args) == 0
    docs = decoded(tmp_path / "w1")
    kept = [r["body"] for r in rows if r["body"].strip()]
    assert docs == [TOK.encode(t, bos=True, eos=True) for t in kept]
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


def test_several_inputs_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n")
    main(
        [
            "preprocess",
            "--input",
            str(tmp_path / "a.txt"),
            str(tmp_path / "b.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
        ]
    )
    assert [TOK.decode(d) for d in decoded(tmp_path / "o")] == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_alpaca_records(tmp_path, layout):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    path = tmp_path / f"a.{layout}"
    path.write_text(json.dumps(records) if layout == "json" else "\n".join(map(json.dumps, records)))
    main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"), "--format", "alpaca"])
    assert [TOK.decode(d) for d in decoded(tmp_path / "o")] == [
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
        "### Instruction:\nSay hi.\n\n### Response:\nHi!",
    ]


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
    err = run_error(
        capsys, ["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "o"), "--workers", "2"]
    )
    assert "d.jsonl:301: no key 'text'" in err
    assert not list(tmp_path.glob("o*"))


def test_parquet_without_pyarrow_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    err = run_error(capsys, ["--input", str(tmp_path / "d.parquet"), "--output-prefix", str(tmp_path / "o")])
    assert "d.parquet: reading Parquet needs pyarrow, which is not installed: pip install 'mixtral-run[data]'" in err
    assert "Traceback" not in err


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
]


def _alpaca_docs() -> list[list[int]]:
    texts = [
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
        "### Instruction:\nName a colour.\n\n### Response:\nBlue",
    ]
    return [TOK.encode(t) for t in texts]


def _write(path, rows: list[dict]) -> None:
    """rows in the container path's suffix names: .json (an array), .jsonl, .jsonl.gz / .json.gz, .parquet."""
    import gzip

    import pyarrow
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(pyarrow.Table.from_pylist(rows), path)
        return
    text = (
        json.dumps(rows)
        if ".json" in path.suffixes and ".jsonl" not in path.suffixes and path.suffixes[-1] != ".gz"
        else "".join(json.dumps(r) + "\n" for r in rows)
    )
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text)


@pytest.mark.parametrize("name", ["c4.json.gz", "c4.jsonl.gz", "d.parquet", "d.jsonl"])
def test_text_records_from_every_container(tmp_path, name):
    """C4's gzipped JSON lines, Parquet (a text column) and plain JSON lines give the same documents."""
    rows = [{"text": f"Document {i}: {'words ' * i}", "url": f"u{i}"} for i in range(5)]
    _write(tmp_path / name, rows)
    assert main(["preprocess", "--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "out")]) == 0
    assert decoded(tmp_path / "out") == [TOK.encode(r["text"]) for r in rows]


@pytest.mark.parametrize("name", ["a.json", "a.jsonl", "a.parquet", "a.jsonl.gz"])
def test_alpaca_from_json_jsonl_and_parquet(tmp_path, name):
    _write(tmp_path / name, ALPACA)
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(tmp_path / name),
                "--output-prefix",
                str(tmp_path / "out"),
                "--format",
                "alpaca",
            ]
        )
        == 0
    )
    assert decoded(tmp_path / "out") == _alpaca_docs()


@pytest.mark.parametrize(
    "name, content, fmt",
    [
        ("bin.txt", b"\xff\xfe\x00binary\x80", "text"),
        ("broken.jsonl.gz", b"not gzip at all", "jsonl"),
        ("fake.parquet", b"PAR1 but not parquet", "parquet"),
    ],
)
def test_undecodable_file_is_one_line_naming_it(tmp_path, capsys, name, content, fmt):
    (tmp_path / name).write_bytes(content)
    err = run_error(capsys, ["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "o")])
    message = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar, one line
    assert f"{tmp_path / name} cannot be read as" in message and "--format" in message and "Traceback" not in err
