"""``postfach queue list|show|retry|delete``: the operator's view of the outbound queue.

Like ``postqueue -p`` / ``postsuper``: a table for people (sizes in KiB/MiB, ages, the last
error), ``--json`` for scripts. ``retry`` makes items due now; a running server picks them up at
its next poll (a few seconds at most).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from postfach.config import Config
from postfach.errors import NotFound, UsageError
from postfach.store import open_store
from postfach.store.base import QueueItem, RecipientState, Store
from postfach.types import QueueId

T = TypeVar("T")


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024 / 1024:.1f} MiB"
    return f"{n / 1024**3:.1f} GiB"


def human_age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def item_to_json(item: QueueItem) -> dict[str, Any]:
    return {
        "id": int(item.id),
        "sender": item.sender,
        "size": item.size,
        "created": item.created.isoformat(),
        "next_attempt": item.next_attempt.isoformat(),
        "attempts": item.attempts,
        "last_error": item.last_error,
        "ret": item.ret,
        "envid": item.envid,
        "requiretls": item.requiretls,
        "smtputf8": item.smtputf8,
        "delay_warned": item.delay_warned,
        "recipients": [
            {"address": r.address, "state": r.state.value, "attempts": r.attempts,
             "last_error": r.last_error, "notify": r.notify, "orcpt": r.orcpt}
            for r in item.recipients
        ],
    }


def _with_store(config: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        store = open_store(config)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _parse_id(value: str) -> QueueId:
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{value!r} is not a queue id (a number, see `postfach queue list`)") from None
    if n <= 0:
        raise UsageError(f"{value!r} is not a queue id (a number, see `postfach queue list`)")
    return QueueId(n)


def format_table(items: list[QueueItem], now: datetime) -> str:
    if not items:
        return "The queue is empty.\n"
    rows = [("ID", "AGE", "SIZE", "TRIES", "NEXT", "SENDER", "PENDING RECIPIENTS", "LAST ERROR")]
    total = 0
    for it in items:
        total += it.size
        pending = [r.address for r in it.recipients if r.state is RecipientState.PENDING]
        rcpts = ", ".join(pending[:3]) + (f" (+{len(pending) - 3})" if len(pending) > 3 else "")
        nxt = (it.next_attempt - now).total_seconds()
        err = (it.last_error or "").replace("\n", " ")
        if len(err) > 60:
            err = err[:57] + "..."
        rows.append((
            str(it.id), human_age((now - it.created).total_seconds()), human_size(it.size), str(it.attempts),
            "now" if nxt <= 0 else "in " + human_age(nxt), it.sender or "<>", rcpts, err,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in (0, 2, 3) else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    lines.append(f"-- {len(items)} message{'s' if len(items) != 1 else ''}, {human_size(total)}")
    return "\n".join(lines) + "\n"


def format_item(it: QueueItem, now: datetime) -> str:
    out = [
        f"Queue id:      {it.id}",
        f"Sender:        <{it.sender}>",
        f"Size:          {human_size(it.size)} ({it.size} bytes)",
        f"Queued:        {it.created.isoformat(timespec='seconds')} ({human_age((now - it.created).total_seconds())}"
        " ago)",
        f"Next attempt:  {it.next_attempt.isoformat(timespec='seconds')}",
        f"Attempts:      {it.attempts}",
    ]
    if it.last_error:
        out.append(f"Last error:    {it.last_error}")
    opts = [f"RET={it.ret}"] if it.ret else []
    if it.envid:
        opts.append(f"ENVID={it.envid}")
    if it.requiretls:
        opts.append("REQUIRETLS")
    if it.smtputf8:
        opts.append("SMTPUTF8")
    if it.delay_warned:
        opts.append("delay warning sent")
    if opts:
        out.append(f"Options:       {' '.join(opts)}")
    out.append("Recipients:")
    for r in it.recipients:
        line = f"  {r.state.value:<9} <{r.address}> attempts={r.attempts}"
        if r.notify:
            line += f" NOTIFY={r.notify}"
        if r.orcpt:
            line += f" ORCPT={r.orcpt}"
        out.append(line)
        if r.last_error:
            out.append(f"            {r.last_error}")
    return "\n".join(out) + "\n"


def _cmd_list(args: argparse.Namespace, config: Config) -> int:
    items = _with_store(config, lambda s: s.queue_list())
    if args.json:
        json.dump([item_to_json(it) for it in items], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(items, datetime.now(UTC)))
    return 0


def _cmd_show(args: argparse.Namespace, config: Config) -> int:
    qid = _parse_id(args.id)
    item = _with_store(config, lambda s: s.queue_get(qid))
    if item is None:
        raise UsageError(f"no queue item {qid}")
    if args.json:
        json.dump(item_to_json(item), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_item(item, datetime.now(UTC)))
    return 0


def _cmd_retry(args: argparse.Namespace, config: Config) -> int:
    qid = _parse_id(args.id) if args.id is not None else None

    async def go(s: Store) -> int:
        if qid is not None and await s.queue_get(qid) is None:
            raise UsageError(f"no queue item {qid}")
        return await s.queue_retry(qid)

    n = _with_store(config, go)
    print(f"{n} message{'s' if n != 1 else ''} scheduled for delivery now")
    return 0


def _cmd_delete(args: argparse.Namespace, config: Config) -> int:
    qid = _parse_id(args.id)

    async def go(s: Store) -> None:
        try:
            await s.queue_delete(qid)
        except NotFound:
            raise UsageError(f"no queue item {qid}") from None

    _with_store(config, go)
    print(f"deleted queue item {qid} (no bounce is sent)")
    return 0


def add_parsers(subparsers: Any) -> None:
    """Registers ``queue list|show|retry|delete`` on the CLI's subparsers."""
    p = subparsers.add_parser("queue", help="the outbound mail queue")
    sub = p.add_subparsers(dest="queue_command", required=True)
    p_list = sub.add_parser("list", help="list queued messages")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)
    p_show = sub.add_parser("show", help="show one queued message with its recipients")
    p_show.add_argument("id")
    p_show.add_argument("--json", action="store_true", help="machine-readable output")
    p_show.set_defaults(func=_cmd_show)
    p_retry = sub.add_parser("retry", help="try one message (or all) again now")
    p_retry.add_argument("id", nargs="?", default=None)
    p_retry.set_defaults(func=_cmd_retry)
    p_del = sub.add_parser("delete", help="remove a message from the queue without a bounce")
    p_del.add_argument("id")
    p_del.set_defaults(func=_cmd_delete)
