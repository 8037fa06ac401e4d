"""Input checks: ids, the retrieve query string and the create body."""

from __future__ import annotations

import pytest

from wsgi_proxy.errors import InvalidRequest, RouteNotFound
from wsgi_proxy.wire.validation import (
    ConversationPath,
    CreateFields,
    ObjectPath,
    ResponsePath,
    RetrieveQuery,
    check_response_id,
    named_ids,
    parse_conversation_path,
    parse_create_body,
    parse_json_object,
    parse_object_path,
    parse_response_path,
    parse_retrieve_query,
    with_model,
)

GOOD_IDS = ["resp_68af4030592c81938ec0a5fbab4a3e9f", "resp_abc123", "a", "A-b_9", "x" * 128]
BAD_IDS = [
    "../models",
    "..",
    "a/b",
    "x\r\nHeader: y",
    "a b",
    "?",
    "a?b=c",
    "#",
    "a#b",
    "%2F",
    "a%2Fb",
    "",
    "x" * 129,
    "résp_1",
    "resp_абв",
    "resp_1\x00",
    "resp.1",
]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_check_response_id_valid_returns_it(value: str) -> None:
    assert check_response_id(value) == value


@pytest.mark.parametrize("value", BAD_IDS)
def test_check_response_id_invalid_names_param(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_response_id(value)
    assert info.value.param == "response_id"
    assert info.value.status == 400
    # A hostile value must not be echoed into the message with its control characters.
    assert "\r" not in info.value.message and "\n" not in info.value.message


def test_check_response_id_custom_param() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_response_id("../x", param="previous_response_id")
    assert info.value.param == "previous_response_id"


@pytest.mark.parametrize(
    ("subpath", "expected"),
    [
        ("resp_1", ResponsePath("item", "resp_1")),
        ("resp_1/cancel", ResponsePath("cancel", "resp_1")),
        ("resp_1/input_items", ResponsePath("input_items", "resp_1")),
        ("cancel", ResponsePath("item", "cancel")),
    ],
)
def test_parse_response_path_valid(subpath: str, expected: ResponsePath) -> None:
    assert parse_response_path(subpath) == expected


@pytest.mark.parametrize(
    "subpath",
    [
        *BAD_IDS,
        "resp_1/",
        "resp_1/delete",
        "resp_1/cancel/x",
        "../models/cancel",
        "a/b/input_items",
        "/resp_1",
        "resp_1/input_items/",
    ],
)
def test_parse_response_path_invalid_names_response_id(subpath: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_response_path(subpath)
    assert info.value.param == "response_id"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", RetrieveQuery(stream=False, starting_after=None)),
        (b"stream=true", RetrieveQuery(stream=True, starting_after=None)),
        (b"stream=false", RetrieveQuery(stream=False, starting_after=None)),
        (b"stream=true&starting_after=0", RetrieveQuery(stream=True, starting_after=0)),
        (b"starting_after=5", RetrieveQuery(stream=False, starting_after=5)),
        (b"starting_after=" + b"9" * 19, RetrieveQuery(stream=False, starting_after=int("9" * 19))),
        (b"starting_after=007", RetrieveQuery(stream=False, starting_after=7)),
        (b"include%5B%5D=a&include%5B%5D=b&stream=true", RetrieveQuery(stream=True, starting_after=None)),
        (b"include[]=a&include[]=b", RetrieveQuery(stream=False, starting_after=None)),
        (b"include_obfuscation=false&unknown=1", RetrieveQuery(stream=False, starting_after=None)),
    ],
)
def test_parse_retrieve_query_valid(query: bytes, expected: RetrieveQuery) -> None:
    assert parse_retrieve_query(query) == expected


@pytest.mark.parametrize(
    ("query", "param"),
    [
        (b"stream=1", "stream"),
        (b"stream=True", "stream"),
        (b"stream=TRUE", "stream"),
        (b"stream=", "stream"),
        (b"stream", "stream"),
        (b"stream=yes", "stream"),
        (b"stream=true&stream=true", "stream"),
        (b"stream=true&stream=false", "stream"),
        (b"starting_after=-1", "starting_after"),
        (b"starting_after=1.5", "starting_after"),
        (b"starting_after=", "starting_after"),
        (b"starting_after=" + b"1" * 20, "starting_after"),
        (b"starting_after=abc", "starting_after"),
        (b"starting_after=%201", "starting_after"),
        (b"starting_after=+1", "starting_after"),  # '+' is a space in a query string
        (b"starting_after=1e3", "starting_after"),
        (b"starting_after=%D9%A3", "starting_after"),  # ARABIC-INDIC DIGIT THREE: int() accepts it
        (b"starting_after=1&starting_after=2", "starting_after"),
        (b"stream=true&starting_after=-1", "starting_after"),
    ],
)
def test_parse_retrieve_query_invalid_names_param(query: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_retrieve_query(query)
    assert info.value.param == param
    assert info.value.status == 400


def test_parse_retrieve_query_non_ascii_bytes_rejected() -> None:
    with pytest.raises(InvalidRequest):
        parse_retrieve_query(b"stream=true&x=\xff")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b"[1, 2]",
        b'"a string"',
        b"42",
        b"null",
        b"true",
        b"\xff\xfe{}",
        b'{"a": NaN',
    ],
)
def test_parse_create_body_not_an_object_has_no_param(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_create_body(body)
    assert info.value.param is None
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": 5}', "model"),
        (b'{"model": ""}', "model"),
        (b'{"model": "   "}', "model"),
        (b'{"model": ["gpt"]}', "model"),
        (b'{"model": "gpt-4o", "stream": "true"}', "stream"),
        (b'{"stream": 1}', "stream"),
        (b'{"stream": 0}', "stream"),
        (b'{"background": "yes"}', "background"),
        (b'{"background": 1}', "background"),
        (b'{"store": "false"}', "store"),
        (b'{"store": {}}', "store"),
        (b'{"previous_response_id": 12}', "previous_response_id"),
        (b'{"previous_response_id": "../x"}', "previous_response_id"),
        (b'{"previous_response_id": "resp_1/cancel"}', "previous_response_id"),
        (b'{"previous_response_id": ""}', "previous_response_id"),
        (b'{"conversation": 7}', "conversation"),
        (b'{"conversation": {"id": 7}}', "conversation"),
        (b'{"conversation": "conv_1/x"}', "conversation"),
        (b'{"prompt_cache_key": 1}', "prompt_cache_key"),
        (b'{"prompt_cache_options": "x"}', "prompt_cache_options"),
        (b'{"prompt_cache_options": {"comparison_response_id": "../x"}}', "prompt_cache_options"),
        (b'{"include": "reasoning.encrypted_content"}', "include"),
        (b'{"include": ["a", 1]}', "include"),
        (b'{"stream_options": []}', "stream_options"),
        (b'{"model": 5, "stream": "x"}', "model"),  # the first wrong field, in CreateFields' order
    ],
)
def test_parse_create_body_wrong_type_names_param(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_create_body(body)
    assert info.value.param == param
    assert repr(param) in info.value.message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", CreateFields()),
        (b'{"model": "gpt-4o", "input": "hi"}', CreateFields(model="gpt-4o")),
        (
            b'{"model": "m", "stream": true, "background": true, "store": true}',
            CreateFields(model="m", stream=True, background=True, store=True),
        ),
        (
            b'{"stream": false, "previous_response_id": "resp_abc"}',
            CreateFields(stream=False, previous_response_id="resp_abc"),
        ),
        (
            b'{"model": null, "stream": null, "background": null, "store": null, "previous_response_id": null}',
            CreateFields(),
        ),
        (
            b'{"model": "m", "future_field": {"x": [1]}, "stream_options": {"include_obfuscation": false}}',
            CreateFields(model="m", stream_options={"include_obfuscation": False}),
        ),
    ],
    ids=["empty", "model", "all_bools", "previous_id", "nulls", "unknown_fields"],
)
def test_parse_create_body_valid(body: bytes, expected: CreateFields) -> None:
    assert parse_create_body(body) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"stream": "true"}',
            "Invalid value for 'stream': it is a string. Expected a boolean (true or false).",
        ),
        (b'{"model": 5}', "Invalid value for 'model': it is a number. Expected a model name (string)."),
        (
            b'{"model": " "}',
            "Invalid value for 'model': it must not be empty. Expected a model name (string).",
        ),
        (
            b'{"stream_options": [1]}',
            "Invalid value for 'stream_options': it is an array. Expected an object.",
        ),
        (
            b'{"include": [null]}',
            "Invalid value for 'include': every item must be a string. Expected a list of strings.",
        ),
    ],
)
def test_a_wrong_create_field_is_said_in_one_sentence(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_create_body(body)
    assert info.value.message == message


def test_create_fields_keep_every_value_they_check() -> None:
    body = (
        b'{"conversation": {"id": "conv_1"}, "prompt_cache_key": "k", "include": ["a"],'
        b' "prompt_cache_options": {"comparison_response_id": "resp_2"}, "input": [{"file_id": "file_3"}]}'
    )
    fields = parse_create_body(body)
    assert (fields.conversation_id, fields.prompt_cache_key, fields.include) == ("conv_1", "k", ["a"])
    assert fields.owned_ids == ("conv_1", "resp_2", "file_3")


def test_parse_json_object_returns_dict() -> None:
    assert parse_json_object(b'{"input": "caf\\u00e9"}') == {"input": "café"}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\xef\xbb\xbf{}", "byte order mark"),
        ('{"model": "m"}'.encode("utf-16"), "not valid UTF-8"),
        (b'{"model": "\xff"}', "not valid UTF-8"),
        (b'{"temperature": NaN}', "holds NaN"),
        (b'{"temperature": Infinity}', "holds Infinity"),
        (b'{"temperature": -Infinity}', "holds -Infinity"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"model": "m"', "could not parse"),
    ],
    ids=[
        "bom",
        "utf16",
        "latin1",
        "nan",
        "infinity",
        "minus_infinity",
        "deep_array",
        "deep_field",
        "truncated",
    ],
)
def test_parse_json_object_refuses_what_a_stricter_reader_would_read_differently(
    body: bytes, says: str
) -> None:
    with pytest.raises(InvalidRequest, match=says) as info:
        parse_json_object(body)
    assert info.value.status == 400 and info.value.param is None
    assert info.value.message.endswith(".")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"a","input":"caf\xc3\xa9"}', b'{"model":"b","input":"caf\xc3\xa9"}'),
        (b'{"model":"a","input":"\\ud800"}', b'{"model":"b","input":"\\ud800"}'),  # a lone surrogate
        (b'{"model":"a","input":"\\ud800\xc3\xa9"}', b'{"model":"b","input":"\\ud800\\u00e9"}'),
    ],
    ids=["utf8", "lone_surrogate", "lone_surrogate_and_utf8"],
)
def test_with_model_replaces_the_model_and_writes_valid_json(body: bytes, expected: bytes) -> None:
    assert with_model(body, "b") == expected


@pytest.mark.parametrize(
    "unit", [b"{},", b"[],", b"1,", b'"a",'], ids=["objects", "arrays", "numbers", "strings"]
)
def test_a_body_of_more_json_values_than_any_model_takes_is_refused_before_parsing(unit: bytes) -> None:
    from wsgi_proxy.errors import RequestTooLarge
    from wsgi_proxy.wire.validation import MAX_JSON_VALUES

    body = b'{"model":"m","input":[' + unit * (MAX_JSON_VALUES + 1) + b"1]}"
    with pytest.raises(RequestTooLarge, match="more than 2,000,000 JSON values") as info:
        parse_json_object(body)
    assert info.value.status == 413


def test_a_large_body_of_few_values_is_parsed() -> None:
    body = b'{"model":"m","input":"' + b"x" * (32 * 1024 * 1024) + b'"}'
    assert len(parse_json_object(body)["input"]) == 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("subpath", "expected"),
    [
        ("conv_1", ConversationPath("conv_1")),
        ("conv_1/items", ConversationPath("conv_1", items=True)),
        ("conv_1/items/msg_2", ConversationPath("conv_1", items=True, item_id="msg_2")),
    ],
)
def test_parse_conversation_path_valid(subpath: str, expected: ConversationPath) -> None:
    assert parse_conversation_path(subpath) == expected


@pytest.mark.parametrize(
    ("subpath", "param"),
    [
        ("conv..1", "conversation_id"),
        ("conv_1%0d%0a", "conversation_id"),
        ("conv_1/items/", "item_id"),
        ("conv_1/items/a b", "item_id"),
    ],
)
def test_parse_conversation_path_invalid_names_param(subpath: str, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_conversation_path(subpath)
    assert caught.value.param == param


@pytest.mark.parametrize("subpath", ["conv_1/", "conv_1/other", "conv_1/items/msg_2/more"])
def test_parse_conversation_path_unknown_route(subpath: str) -> None:
    with pytest.raises(RouteNotFound):
        parse_conversation_path(subpath)


@pytest.mark.parametrize(
    ("body", "owned"),
    [
        (b'{"model":"m"}', ()),
        (b'{"previous_response_id":"resp_1"}', ("resp_1",)),
        (b'{"conversation":"conv_1"}', ("conv_1",)),
        (b'{"conversation":{"id":"conv_1"}}', ("conv_1",)),
        (
            b'{"conversation":"conv_1","prompt_cache_options":{"comparison_response_id":"resp_2"}}',
            ("conv_1", "resp_2"),
        ),
        (b'{"prompt_cache_options":{"retention":"24h"}}', ()),
    ],
)
def test_a_create_names_the_ids_its_team_must_own(body: bytes, owned: tuple[str, ...]) -> None:
    assert parse_create_body(body).owned_ids == owned


@pytest.mark.parametrize(
    "body",
    [
        b'{"conversation":"../conv"}',
        b'{"conversation":{"id":null}}',
        b'{"conversation":7}',
        b'{"prompt_cache_options":{"comparison_response_id":"resp/x"}}',
        b'{"prompt_cache_options":"no"}',
    ],
)
def test_a_create_naming_an_unsafe_id_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_create_body(body)
    assert caught.value.param in ("conversation", "prompt_cache_options")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"input": "no files"}', ()),
        (b'{"input": [{"type": "input_file", "file_id": "file-1"}]}', ("file-1",)),
        (b'{"input": [{"type": "input_file", "file\\u005fid": "file-1"}]}', ("file-1",)),
        (b'{"tools": [{"type": "file_search", "vector_store_ids": ["vs_1", "vs_2"]}]}', ("vs_1", "vs_2")),
        (b'{"tools": [{"type": "code_interpreter", "container": "cntr_1"}]}', ("cntr_1",)),
        (
            b'{"tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file-3"]}}]}',
            ("file-3",),
        ),
        (b'{"input_file_id": "file-4", "metadata": {"file_id": "file-4"}}', ("file-4",)),
    ],
)
def test_a_body_names_the_files_vector_stores_and_containers_its_team_must_own(
    body: bytes, named: tuple[str, ...]
) -> None:
    assert parse_create_body(body).named == named
    assert named_ids(parse_json_object(body)) == named


def test_a_named_id_that_is_not_a_safe_token_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_create_body(b'{"input": [{"type": "input_file", "file_id": "../files"}]}')
    assert caught.value.param == "file_id"


@pytest.mark.parametrize(
    ("subpath", "expected"),
    [
        ("vs_1", ObjectPath("vs_1")),
        ("vs_1/files/file-2", ObjectPath("vs_1", "/files/file-2")),
        ("file-1/content", ObjectPath("file-1", "/content")),
    ],
)
def test_parse_object_path(subpath: str, expected: ObjectPath) -> None:
    assert parse_object_path(subpath) == expected


@pytest.mark.parametrize(
    ("subpath", "param"), [("a b", "id"), ("vs_1/..", None), ("vs_1/a%2Fb", None), ("vs_1//x", None)]
)
def test_parse_object_path_refuses(subpath: str, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_object_path(subpath)
    assert caught.value.param == param
