"""Chat dataset formats people have, read into one form: a list of {role, content} messages.

Contract:
- `to_messages(record, origin, fmt, field)` returns the record as OpenAI-style messages with
  roles `system` / `user` / `assistant` (the roles the LLaDA2 chat template renders), or raises
  `BadRecord` naming `origin` (file:line) and what to change.
- Formats (`data.format`):
    messages           {"messages": [{"role", "content"}, ...]}   (OpenAI; `data.field` renames
                       the key); roles system / user / assistant (`human`, `gpt` accepted)
    sharegpt           {"conversations": [{"from", "value"}, ...]}; from human / user / gpt /
                       assistant / system (ShareGPT, as LLaMA-Factory and axolotl read it)
    alpaca             {"instruction", "input"?, "output", "system"?}: one user turn (the
                       instruction, then a blank line and the input when it is not empty), one
                       assistant turn (Stanford Alpaca's fields)
    prompt_completion  {"prompt", "completion"} (TRL's prompt-completion format; strings)
    auto               picked per record from its keys, in the order above
- Tool and function messages (`tool`, `function`, `ipython`, `observation`) are rejected: the
  LLaDA2 chat template has no role for them, and rendering them as another role would train the
  model on a layout it never sees at inference. Convert them to user text before training.
- The last message must be the assistant's (the response trained last); every other assistant
  message is an earlier turn (supervised or not by `data.supervise`, see `pipeline`).
"""

from __future__ import annotations

from collections.abc import Callable

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
TOOL_ROLES = ("tool", "function", "ipython", "observation", "function_call", "tool_call")


class BadRecord(ValueError):
    """A record that cannot be trained on; the message names its origin and what to change."""


def _role(raw: object, origin: str, k: int) -> str:
    if not isinstance(raw, str):
        raise BadRecord(f"{origin}: message {k} has no string role")
    role = raw.strip().lower()
    if role in TOOL_ROLES:
        raise BadRecord(
            f"{origin}: message {k} has role '{raw}': the LLaDA2 chat template has no tool "
            "role; drop tool turns or write their content into a user message"
        )
    if role not in ROLE_ALIASES:
        raise BadRecord(
            f"{origin}: message {k} has unknown role '{raw}' (use system, user or assistant)"
        )
    return ROLE_ALIASES[role]


def _turns(
    turns: object, origin: str, key: str, role_key: str, content_key: str
) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"{origin}: '{key}' must be a non-empty list of messages")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise BadRecord(
                f"{origin}: message {k} of '{key}' needs string fields '{role_key}' and "
                f"'{content_key}'"
            )
        messages.append(
            {"role": _role(turn.get(role_key), origin, k), "content": turn[content_key]}
        )
    return messages


def _string(record: dict, key: str, origin: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"{origin}: field '{key}' must be a string")
    return value


def from_messages(record: dict, origin: str, field: str | None = None) -> list[dict[str, str]]:
    field = field or "messages"
    return _turns(record.get(field), origin, field, "role", "content")


def from_sharegpt(record: dict, origin: str, field: str | None = None) -> list[dict[str, str]]:
    field = field or "conversations"
    return _turns(record.get(field), origin, field, "from", "value")


def from_alpaca(record: dict, origin: str, field: str | None = None) -> list[dict[str, str]]:
    instruction = _string(record, "instruction", origin)
    extra = _string(record, "input", origin, required=False)
    system = _string(record, "system", origin, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _string(record, "output", origin)},
    ]


def from_prompt_completion(
    record: dict, origin: str, field: str | None = None
) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": _string(record, "prompt", origin)},
        {"role": "assistant", "content": _string(record, "completion", origin)},
    ]


READERS: dict[str, Callable[..., list[dict[str, str]]]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
}


def detect_format(record: dict, field: str | None = None) -> str | None:
    """The format whose keys `record` has, in the order of FORMATS; None if none fits."""
    if (field and field in record) or "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def to_messages(
    record: object, origin: str, fmt: str = "auto", field: str | None = None
) -> list[dict[str, str]]:
    """`record` (one dataset row) as chat messages ending with the assistant's response.

    fmt: one of FORMATS; field: the messages key for `messages` (default "messages") or the
    conversations key for `sharegpt` (default "conversations").
    Raises BadRecord (a ValueError) naming `origin` for a record that does not fit, and
    ValueError for an unknown `fmt`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(record, dict):
        raise BadRecord(f"{origin}: a record must be a JSON object, got {type(record).__name__}")
    chosen = detect_format(record, field) if fmt == "auto" else fmt
    if chosen is None:
        raise BadRecord(
            f"{origin}: missing field '{field or 'messages'}' (a list of {{role, content}} "
            f"messages), and no other chat format fits the keys {sorted(record)}: cannot tell "
            "the chat format; expected 'messages', 'conversations', 'instruction'+'output' or "
            "'prompt'+'completion' (or set data.format and data.field)"
        )
    messages = READERS[chosen](record, origin, field)
    last = messages[-1]
    if last["role"] != "assistant":
        raise BadRecord(
            f"{origin}: the last message must be the assistant's response, got '{last['role']}'"
        )
    if not last["content"].strip():
        raise BadRecord(f"{origin}: empty assistant response")
    return messages
