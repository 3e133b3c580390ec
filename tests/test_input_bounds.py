"""Bounded input: record size limits, regular files only, data errors with a location,
and over-long texts cut before they are tokenized (issue 10, points 5, 8 and 9)."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from safer_audit import data
from safer_audit.data import load_pairs, validate_dataset
from safer_audit.errors import DataError

GOOD = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}) + "\n"


def error_of(source, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_pairs(source, **kwargs)
    return str(caught.value)


def big_record(size: int) -> str:
    return json.dumps({"chosen": "x" * size, "rejected": "y"}) + "\n"


def test_a_line_over_the_limit_names_file_line_and_size(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD + big_record(3 * 2**20) + GOOD)
    assert error_of(path, max_record_bytes=2**20) == (
        f"{path}:2: record is 3 MiB, over the --max-record-bytes limit (1 MiB)")
    assert error_of(path, max_record_bytes=1_000_000).endswith("(1,000,000 bytes)")
    skipped = load_pairs(path, max_record_bytes=2**20, skip_invalid=True)
    assert (len(skipped.pairs), skipped.pairs["line"].to_list()) == (2, [1, 3])
    assert len(load_pairs(path).pairs) == 3  # the default is far above real records
    assert data.MAX_RECORD_BYTES == 16 * 2**20


def test_a_gzip_bomb_is_bounded_by_its_decompressed_line(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as stream:  # ~64 KiB compressed, 64 MiB decompressed
        stream.write(GOOD + '{"chosen": "' + "a" * (64 * 2**20) + '"}\n')
    assert error_of(path) == f"{path}:2: record is 64 MiB, over the --max-record-bytes limit (16 MiB)"


def test_json_arrays_and_columnar_rows_have_the_limit_too(tmp_path):
    array = tmp_path / "data.json"
    array.write_text("[" + GOOD + "," + big_record(2**20) + "]")
    assert error_of(array, max_record_bytes=2**19) == (
        f"{array}:2: record is more than 512 KiB, over the --max-record-bytes limit (512 KiB)")
    assert len(load_pairs(array).pairs) == 2
    import polars as pl

    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "x" * 2**20, "rejected": "y"}]
    pl.DataFrame(rows).write_parquet(tmp_path / "data.parquet")
    assert error_of(tmp_path / "data.parquet", max_record_bytes=2**19).startswith(
        f"{tmp_path / 'data.parquet'}:2: record is 1 MiB, over")
    pl.DataFrame(rows).write_csv(tmp_path / "data.csv")
    assert error_of(tmp_path / "data.csv", max_record_bytes=2**19).startswith(
        f"{tmp_path / 'data.csv'}:2: record is more than 512 KiB, over")


def test_only_regular_files_are_read(tmp_path):
    os.symlink("/dev/zero", tmp_path / "x.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    # In a child with a timeout: before the fix both would block or grow without end.
    script = ("import sys\nfrom safer_audit.data import load_pairs\nfrom safer_audit.errors import DataError\n"
              "for name in sys.argv[1:]:\n    try:\n        load_pairs(name)\n"
              "    except DataError as exc:\n        print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.jsonl"), str(tmp_path / "fifo.jsonl")],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    hint = "; give a regular file, a datasets directory or - for JSON Lines on standard input"
    assert done.stdout.splitlines() == [f"{tmp_path / 'x.jsonl'}: is a character device{hint}",
                                        f"{tmp_path / 'fifo.jsonl'}: is a FIFO{hint}"]


def test_standard_input_is_json_lines(tmp_path, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((GOOD + big_record(100)).encode())))
    result = load_pairs("-", max_record_bytes=100, skip_invalid=True)
    assert (result.source, result.pairs["source"].to_list(), str(result.skipped[0])) == (
        "<stdin>", ["<stdin>"], "<stdin>:2: record is 131 bytes, over the --max-record-bytes limit (100 bytes)")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_what_json_cannot_hold_is_an_error_at_its_line(tmp_path, suffix):
    deep = "[" * 100_000 + "]" * 100_000
    long_id = '{"id": ' + "1" * 5000 + ', "chosen": "a", "rejected": "b"}'
    for bad, message in ((deep, "invalid JSON: nested too deeply"),
                         (long_id, f"invalid JSON: a number of more than {sys.get_int_max_str_digits()} digits")):
        path = tmp_path / f"data{suffix}"
        path.write_text(GOOD + bad + "\n" if suffix == ".jsonl" else "[" + GOOD + "," + bad + "]")
        assert error_of(path) == f"{path}:2: {message}"


def test_a_lone_surrogate_is_refused_where_it_is(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD + '{"prompt": "q", "chosen": "fine \\ud800", "rejected": "b"}\n')
    expected = f'{path}:2: field "chosen" holds a lone surrogate (\\ud800) at character 6: not valid Unicode text'
    assert error_of(path) == expected
    with pytest.raises(DataError) as caught:  # validate agrees with scan's loader
        validate_dataset(path)
    assert str(caught.value) == expected
    messages = tmp_path / "messages.jsonl"
    messages.write_text(json.dumps({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                    "rejected": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "b"}]}).replace('"b"', '"\\udc00"')
                        + "\n")
    assert error_of(messages) == (f'{messages}:1: field "rejected[1].content" holds a lone surrogate (\\udc00) '
                                  "at character 1: not valid Unicode text")
