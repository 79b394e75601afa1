"""Completion, inspection, history and is_complete: what the shell knows
about code, as the worker's replies."""

from __future__ import annotations

from typing import Any

from ..protocol import (
    CompleteReplyMessage,
    HistoryMessage,
    HistoryReplyMessage,
    InspectReplyMessage,
    IsCompleteReplyMessage,
)
from .shell import jsonable


def complete(shell: Any, req: Any) -> CompleteReplyMessage:
    from IPython.core.completer import provisionalcompleter, rectify_completions

    code = req.code
    cursor = len(code) if req.cursor_pos is None else req.cursor_pos
    with provisionalcompleter():
        completions = list(rectify_completions(code, shell.Completer.completions(code, cursor)))
    reply = CompleteReplyMessage(parent_id=req.id, cursor_start=cursor, cursor_end=cursor)
    if completions:
        reply.cursor_start = completions[0].start
        reply.cursor_end = completions[0].end
        reply.matches = [c.text for c in completions]
    reply.metadata = {
        "_jupyter_types_experimental": [
            {
                "start": c.start,
                "end": c.end,
                "text": c.text,
                "type": c.type,
                "signature": c.signature,
            }
            for c in completions
        ]
    }
    return reply


def inspect(shell: Any, req: Any) -> InspectReplyMessage:
    from IPython.utils.tokenutil import token_at_cursor

    code = req.code
    cursor = len(code) if req.cursor_pos is None else req.cursor_pos
    name = token_at_cursor(code, cursor)
    reply = InspectReplyMessage(parent_id=req.id)
    try:
        bundle = shell.object_inspect_mime(name, detail_level=req.detail_level)
        if not shell.enable_html_pager:
            bundle.pop("text/html", None)
        reply.data = jsonable(bundle)
        reply.found = True
    except KeyError:
        reply.found = False
    return reply


def history(shell: Any, req: HistoryMessage) -> HistoryReplyMessage:
    manager = shell.history_manager
    if req.hist_access_type == "tail":
        hist = manager.get_tail(req.n or 10, raw=req.raw, output=req.output, include_latest=True)
    elif req.hist_access_type == "range":
        # IPython numbers the entries of the current session 0 (its alias
        # for "current"); a client needs the real number it asked for.
        hist = [
            (session or manager.session_number, line, entry)
            for session, line, entry in manager.get_range(
                req.session, req.start, req.stop, raw=req.raw, output=req.output
            )
        ]
    elif req.hist_access_type == "search":
        hist = manager.search(
            req.pattern, raw=req.raw, output=req.output, n=req.n, unique=req.unique
        )
    else:
        hist = []
    return HistoryReplyMessage(parent_id=req.id, history=jsonable(list(hist)))


def is_complete(shell: Any, req: Any) -> IsCompleteReplyMessage:
    status, indent = shell.input_transformer_manager.check_complete(req.code)
    reply = IsCompleteReplyMessage(parent_id=req.id, status=status)
    if status == "incomplete":
        reply.indent = " " * (indent or 0)
    return reply
