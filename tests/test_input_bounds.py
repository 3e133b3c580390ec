"""Bounded input: record size limits, regular files only, data errors with a location,
and over-long texts cut before they are tokenized."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safer_audit import data
from safer_audit.data import load_pairs, validate_dataset
from safer_audit.errors import DataError

GOOD = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}) + "\n"
GOOD_PROMPT = json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n"  # a file holds one schema


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
    path.write_text(GOOD_PROMPT + '{"prompt": "q", "chosen": "fine \\ud800", "rejected": "b"}\n')
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


# --- over-long texts are cut before they are tokenized -----------------------------------

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hh-harmless-300.jsonl"


class RecordingTokenizer:
    """A tokenizer that remembers the longest text it was given."""

    def __init__(self, tokenizer):
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "longest", 0)

    def __call__(self, texts, **kwargs):
        batch = [texts] if isinstance(texts, str) else texts
        object.__setattr__(self, "longest", max([self.longest, *map(len, batch)]))
        return self._tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __setattr__(self, name, value):
        setattr(self._tokenizer, name, value)


def fixture_texts(backend, pairs: int):
    from safer_audit.model.texts import pair_texts

    return pair_texts(load_pairs(FIXTURE).pairs.head(pairs), backend)


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_bert_dir"])
def test_long_texts_are_cut_before_tokenizing_and_tokenize_the_same(model, request):
    from safer_audit.backends.hf import HFModelBackend

    backend = HFModelBackend(str(request.getfixturevalue(model)), device="cpu")
    texts = fixture_texts(backend, 30)
    tokenizer = backend.tokenizer
    for max_length in (16, 48):
        backend.tokenizer = recording = RecordingTokenizer(tokenizer)
        ids, offsets, special = backend.tokenize([t.text for t in texts], max_length=max_length,
                                                 has_special_tokens=False)
        # the whole text through the tokenizer, as before the cut
        tokenizer.truncation_side = "left"
        whole = tokenizer([t.text for t in texts], truncation=True, max_length=max_length,
                          return_offsets_mapping=True, return_special_tokens_mask=True)
        assert ids == whole["input_ids"]
        assert [list(map(tuple, row)) for row in offsets] == [list(map(tuple, row)) for row in whole["offset_mapping"]]
        assert special == whole["special_tokens_mask"]
        assert recording.longest < max(len(t.text) for t in texts) // 2


def test_activations_of_cut_texts_are_unchanged(tiny_llama_dir, tmp_path, monkeypatch):
    from safer_audit.backends.hf import HFModelBackend
    from safer_audit.config import ActivationConfig
    from safer_audit.model.activations import extract_activations

    backend = HFModelBackend(str(tiny_llama_dir), device="cpu")
    texts = fixture_texts(backend, 20)
    config = ActivationConfig(model="tiny", layer=1, positions="all", max_length=32, batch_size=8,
                              cache_dir=tmp_path / "cut")
    cut = extract_activations(texts, backend, config)
    monkeypatch.setattr(backend, "_cut", lambda text, max_length: 0)
    config.cache_dir = tmp_path / "whole"
    whole = extract_activations(texts, backend, config)
    assert cut.n_texts == whole.n_texts == 40
    for index in range(cut.n_texts):
        assert cut.text(index).token_ids.tolist() == whole.text(index).token_ids.tolist()
        assert cut.text(index).acts.equal(whole.text(index).acts)


def test_a_response_of_megabytes_is_never_tokenized_whole(tiny_llama_dir, tmp_path):
    from safer_audit.backends.hf import HFModelBackend
    from safer_audit.config import ActivationConfig
    from safer_audit.model.activations import extract_activations
    from safer_audit.model.texts import pair_texts

    words = "the a harm help you I can not should would please sorry lock pick".split()
    huge = " ".join(words * 100_000)  # 5.2 MB
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD_PROMPT + json.dumps({"prompt": "q", "chosen": huge, "rejected": "no"}) + "\n")
    pairs = load_pairs(path).pairs
    backend = HFModelBackend(str(tiny_llama_dir), device="cpu")
    backend.tokenizer = recording = RecordingTokenizer(backend.tokenizer)
    texts = pair_texts(pairs, backend)
    config = ActivationConfig(model="tiny", layer=1, positions="response", max_length=64, batch_size=4,
                              cache_dir=tmp_path / "cache")
    store = extract_activations(texts, backend, config)
    assert len(huge) > 5_000_000 and recording.longest < 50_000
    # the huge chosen response fills the window, to its last word
    read = store.text(2)
    assert len(read.token_ids) >= 62 and read.positions.tolist()[-1] == 63
    assert backend.tokenizer.decode(read.token_ids.tolist()).endswith(huge[-40:])


def test_a_failing_chat_template_is_one_error(tiny_llama_dir):
    from safer_audit.backends.hf import HFModelBackend
    from safer_audit.errors import ScanError

    backend = HFModelBackend(str(tiny_llama_dir), device="cpu")
    backend.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ScanError) as caught:
        backend.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
    assert str(caught.value) == ("model '" + str(tiny_llama_dir) + "': the chat template fails on the conversation "
                                 "(user/assistant) that opens 'hi': TemplateError: Conversation roles must alternate")
