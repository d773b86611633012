import pytest

from gemma_keras import GemmaTokenizer, apply_chat_template
from gemma_keras.chat_template import ChatTemplateError


def test_single_turn():
    text = apply_chat_template([{"role": "user", "content": "Explain AI."}])
    assert text == "<bos><start_of_turn>user\nExplain AI.<end_of_turn>\n<start_of_turn>model\n"


def test_multi_turn_with_system_folded_into_first_user_turn():
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": " And now? "},
    ]
    assert apply_chat_template(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nAnd now?<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    "messages,message",
    [
        ([], "non-empty"),
        ([{"role": "model", "content": "x"}], r"messages\[0\].*expected 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "robot", "content": "a"}], "role 'robot'"),
        ([{"role": ["user"], "content": "a"}], r"role \['user'\]; use 'user' or 'model'"),
        ([{"role": "system", "content": "a"}], "followed by a user"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": 3}], "must be a string"),
    ],
)
def test_bad_conversations(messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        apply_chat_template(messages)


def test_template_encodes_with_one_bos(tokenizer_proto):
    tokenizer = GemmaTokenizer(tokenizer_proto)
    ids = tokenizer.encode(apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert ids.count(tokenizer.bos_id) == 1 and ids[1] == tokenizer.start_of_turn_id
