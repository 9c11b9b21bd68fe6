"""kcat-style record formatting and human tables."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence

from streamd.client.records import ConsumerRecord

_TOKEN = re.compile(r"%[tpoksThS%]|\\[nt\\]")


def _text(raw: bytes | None) -> str:
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace")


def format_record(fmt: str, r: ConsumerRecord) -> str:
    """Expand kcat tokens: %t topic, %p partition, %o offset, %k key, %s value,
    %T timestamp (ms), %h headers (k=v,...), %% a percent sign; escapes \\n \\t."""

    def expand(m: re.Match[str]) -> str:
        token = m.group(0)
        match token:
            case "%t":
                return r.topic
            case "%p":
                return str(r.partition)
            case "%o":
                return str(r.offset)
            case "%k":
                return _text(r.key)
            case "%s" | "%S":
                return _text(r.value)
            case "%T":
                return str(r.timestamp_ms)
            case "%h":
                return ",".join(f"{k}={_text(v)}" for k, v in r.headers)
            case "%%":
                return "%"
            case "\\n":
                return "\n"
            case "\\t":
                return "\t"
            case _:
                return "\\"
    return _TOKEN.sub(expand, fmt)


def _jsonable(raw: bytes | None):
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


def record_json(r: ConsumerRecord) -> str:
    return json.dumps(
        {
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "timestamp_ms": r.timestamp_ms,
            "key": _jsonable(r.key),
            "value": _jsonable(r.value),
            "headers": {k: _jsonable(v) for k, v in r.headers},
        }
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells)
