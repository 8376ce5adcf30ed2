import json

import pytest
import torch

from quikft import data
from quikft.data import DataError


def test_wikitext_rows_follow_the_hub_rule():
    raw = " \n = Title = \n \n Body line . \n"
    assert data.wikitext_rows(raw) == ["", " = Title = \n", "", " Body line . \n"]


def test_local_wikitext_test_string_matches_the_documented_protocol(shared_data):
    text = data.eval_text("wikitext2", "test")
    # Length and opening given in shared/data/SOURCES.md for "\n\n".join(rows).
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")


def test_calibration_never_reads_the_test_split(shared_data):
    assert data.available_split("wikitext2", data.TRAINING_SPLITS) == "validation"
    calib = data.calibration_text("wikitext2")
    valid = (shared_data / "wikitext-2-raw/wiki.valid.raw").read_text()
    test_opening = " = Robert Boulter = "
    assert test_opening not in calib
    assert calib.split("\n\n")[0].strip() == valid.splitlines()[1].strip()


def test_named_sources_load(shared_data):
    assert len(data.load_documents("c4", "train")) == 300
    assert len(data.load_instruction_records("alpaca")) == 1000
    assert "instruction" in data.load_instruction_records("alpaca-gpt4")[0]
    assert len(data.load_documents("ptb", "validation")) == 3370


def test_sampler_is_seeded_and_returns_contiguous_windows():
    stream = torch.arange(1000)
    a = data.sample_windows(stream, nsamples=8, seqlen=50, seed=3)
    b = data.sample_windows(stream, nsamples=8, seqlen=50, seed=3)
    c = data.sample_windows(stream, nsamples=8, seqlen=50, seed=4)
    assert a.shape == (8, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each window is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 49, dtype=torch.long))
    assert int(a.max()) < 1000


def test_sampler_rejects_short_data_with_counts():
    with pytest.raises(DataError, match="has 10 tokens, fewer than one window of 64"):
        data.sample_windows(torch.arange(10), nsamples=2, seqlen=64, seed=0)


def test_calibration_windows_from_a_text_file(tiny, text_file):
    _, tokenizer = tiny
    windows = data.calibration_windows(tokenizer, str(text_file), nsamples=4, seqlen=32, seed=0)
    assert windows.shape == (4, 32)
    again = data.calibration_windows(tokenizer, str(text_file), nsamples=4, seqlen=32, seed=0)
    assert torch.equal(windows, again)


def test_empty_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no text found"):
        data.calibration_text(str(empty))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        data.read_documents(bad)


def test_json_and_jsonl_records(tmp_path):
    instr = tmp_path / "instr.json"
    instr.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    assert data.read_documents(instr) == ["Say hi\n\nhi"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    assert data.read_instructions(chat)[0]["messages"][1]["content"] == "b"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match="'text' field or instruction fields"):
        data.read_documents(wrong)


def test_unknown_name_and_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        data.load_documents("no-such-dataset.txt")
    with pytest.raises(DataError, match="unknown dataset"):
        data.available_split("nope", ("train",))


def test_missing_local_split_explains(shared_data):
    with pytest.raises(DataError, match="split 'test' is not in the local data folder"):
        data.load_documents("c4", "test")
