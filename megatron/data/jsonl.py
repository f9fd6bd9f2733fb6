"""Reading a JSONL corpus: its non-blank lines, numbered, and the texts under the requested keys of
one line, or a clear problem."""

import json


def texts_of_line(line: bytes | str, json_keys: list[str]) -> list[str]:
    """The string under each of `json_keys`; ValueError describing what is wrong with the line
    (the caller adds FILE:LINE)."""
    try:
        document = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a JSON object: {e}") from e
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got {type(document).__name__}")
    texts = []
    for key in json_keys:
        if key not in document:
            raise ValueError(f"missing key {key!r}")
        if not isinstance(document[key], str):
            raise ValueError(f"key {key!r} is not a string")
        texts.append(document[key])
    return texts


def numbered_lines(path: str):
    """Yield ("FILE:LINE", line) for each non-blank line of a JSONL file, as bytes: parsing them is
    left to `texts_of_line`, in whichever process tokenizes them."""
    with open(path, "rb") as f:
        # Numbered before blank lines (a trailing newline, say) are dropped, so errors name the line.
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{line_number}", line
