"""Gemma's instruction-tuned chat format."""

_ROLES = {"user": "user", "model": "model", "assistant": "model"}


class ChatTemplateError(ValueError):
    """The messages cannot be written as a Gemma conversation."""


def apply_chat_template(messages, add_generation_prompt=True):
    """Writes `[{"role", "content"}, ...]` as Gemma chat text.

    ```
    <bos><start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
    ```
    Roles are `user` and `model` (`assistant` is accepted as `model`), they
    must alternate starting with `user`; contents are stripped of surrounding
    whitespace, as Gemma's own template does. A leading `system` message has no
    turn of its own in Gemma: it is folded into the first user turn,
    separated by a blank line. With `add_generation_prompt` the text ends
    with an open model turn for the model to complete.

    >>> apply_chat_template([{"role": "user", "content": "Hi"}])
    '<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatTemplateError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}."
            )
        if not isinstance(message["content"], str):
            raise ChatTemplateError(f"messages[{index}]['content'] must be a string.")
    messages = list(messages)
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
        if not messages or messages[0]["role"] != "user":
            raise ChatTemplateError("A system message must be followed by a user message.")
    text = "<bos>"
    for index, message in enumerate(messages):
        role = _ROLES.get(message["role"]) if isinstance(message["role"], str) else None
        if role is None:
            raise ChatTemplateError(
                f"messages[{index}] has role {message['role']!r}; use 'user' or 'model' "
                "('system' only as the first message)."
            )
        expected = "user" if index % 2 == 0 else "model"
        if role != expected:
            raise ChatTemplateError(
                f"messages[{index}] has role {message['role']!r} but roles must alternate "
                f"user/model starting with user; expected {expected!r} here."
            )
        content = message["content"].strip()
        if index == 0 and system is not None:
            content = f"{system.strip()}\n\n{content}"
        text += f"<start_of_turn>{role}\n{content}<end_of_turn>\n"
    if add_generation_prompt:
        text += "<start_of_turn>model\n"
    return text
