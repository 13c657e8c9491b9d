"""Dataset loading: the formats people bring, and errors that name file, line and field."""

import json

import pytest

from train.data import DataError, data_hash, load_file, load_files
from tests.conftest import write_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hey. Go."}], "topic": "x"}


def test_three_formats_become_the_same_messages(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        CHAT,
        {"instruction": "Summarize", "input": "a long text", "output": "Short."},
        {"prompt": "hi", "response": "Hey. Go."},
        {"prompt": "hi", "completion": "Hey. Go.", "system": "Be brief."},
    ])
    chat, alpaca, pair, completion = load_file(path, "en")
    assert chat.messages == pair.messages == CHAT["messages"]
    assert alpaca.messages == [{"role": "user", "content": "Summarize\n\na long text"},
                               {"role": "assistant", "content": "Short."}]
    assert completion.messages[0] == {"role": "system", "content": "Be brief."}
    assert chat.meta == {"topic": "x"} and chat.source.endswith("mixed.jsonl:1")


def test_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n\n  {"prompt": "c", "response": ""}\n]\n')
    with pytest.raises(DataError) as err:
        load_file(path, "en")
    assert (err.value.line, err.value.field) == (4, "response")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"prompt": "a", "response": "b"}]}))
    assert load_file(wrapped, "en")[0].answer == "b"


BAD_RECORDS = [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "must end with an assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages[1].role", "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages[1].role", "only come first"),
    ({"instruction": "do it"}, "output", "missing"),
    ({"prompt": "   ", "response": "b"}, "prompt", "is empty"),
    ({"prompt": "a", "response": "b", "lang": ""}, "language", "non-empty"),
    ({"question": "a", "answer": "b"}, "(record)", "unknown format"),
    (["not", "an", "object"], "(record)", "expected a JSON object"),
    ({"prompt": "x" * 20_001, "response": "b"}, "prompt", "limit is 20000"),
]


@pytest.mark.parametrize("record,field,message", BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, record, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHAT, CHAT, record])
    with pytest.raises(DataError) as err:
        load_file(path, "en")
    assert err.value.line == 3 and err.value.field == field and message in err.value.message
    assert str(err.value).startswith(f"{path}:3: field {field!r}:")


def test_invalid_json_and_encoding_are_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(CHAT) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: .*invalid JSON"):
        load_file(path, "en")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(CHAT).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl:2: .*UTF-8"):
        load_file(latin, "en")


def test_language_filter_and_per_record_override(tmp_path):
    en = write_jsonl(tmp_path / "en.jsonl", [CHAT, {**CHAT, "lang": "ko"}])
    ko = write_jsonl(tmp_path / "ko.jsonl", [CHAT])
    assert len(load_files([(en, "en"), (ko, "ko")], ["en"])) == 1
    assert len(load_files([(en, "en"), (ko, "ko")], ["ko"])) == 2
    assert len(load_files([(en, "en"), (ko, "ko")])) == 3


def test_data_hash_changes_with_content_and_languages(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [CHAT])
    first = data_hash([path], ["en"])
    assert first == data_hash([path], ["en"]) != data_hash([path], ["en", "ko"])
    write_jsonl(path, [CHAT, CHAT])
    assert data_hash([path], ["en"]) != first
