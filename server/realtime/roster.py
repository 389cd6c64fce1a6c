"""Who is on each presence channel this process serves, and the join/leave sent to its subscribers.

Fed by the presence NOTIFYs on the broker's LISTEN connection (every process's new counts,
in commit order) and by the table when a channel starts being served or the listener
reconnects (notifications may have been missed meanwhile). Counts are absolute, so a
notification applied twice, or one already in the table read, changes nothing.

Subscribers are told about changes at ticks, by comparing what they were told (announced)
with who is here now: a burst of a thousand reconnects is one comparison, and a user back
within the grace period was never announced gone, so a reconnect sends neither leave nor
join (PROTOCOL §14). join and leave travel through the hub like events, encoded once, but
they have no offset and are never stored or replayed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

import orjson

from server.realtime.wire import EncodedNotice
from server.storage.db import DATABASE_DOWN_ERRORS

if TYPE_CHECKING:
    from server.realtime.hub import Hub
    from server.realtime.presence import Presence

log = logging.getLogger("herald.roster")

TICK = 0.1  # seconds new arrivals gather before their joins go out together
RETRY = 1.0


class ChannelView:
    """One channel: which processes hold each member, and what subscribers were told."""

    __slots__ = ("absent_since", "announced", "dirty", "holders", "loaded", "usernames")

    def __init__(self) -> None:
        self.holders: dict[str, dict[str, int]] = {}  # member -> process -> connections
        self.usernames: dict[str, str] = {}
        self.announced: set[str] = set()
        self.absent_since: dict[str, float] = {}
        self.dirty: dict[str, None] = {}
        self.loaded = False

    def set(self, member: str, process: str, username: str, count: int, now: float) -> None:
        processes = self.holders.get(member)
        if count > 0:
            if processes is None:
                processes = self.holders[member] = {}
            processes[process] = count
            if username:
                self.usernames[member] = username
        elif processes is not None:
            processes.pop(process, None)
            if not processes:
                del self.holders[member]
        self.mark(member, now)

    def mark(self, member: str, now: float) -> None:
        if member in self.holders:
            self.absent_since.pop(member, None)
        else:
            self.absent_since.setdefault(member, now)
        self.dirty[member] = None

    def replace(self, rows, now: float) -> None:
        """The table's picture of this channel; on a first load it is what subscribers start from."""
        holders: dict[str, dict[str, int]] = {}
        for row in rows:
            holders.setdefault(row["member"], {})[row["process"]] = row["connections"]
            self.usernames[row["member"]] = row["username"]
        before, self.holders = self.holders, holders
        if not self.loaded:
            self.loaded = True
            self.announced = set(holders)
            self.absent_since.clear()
            self.dirty.clear()
            return
        for member in before.keys() | holders.keys():
            if before.get(member) != holders.get(member):
                self.mark(member, now)


class Roster:
    def __init__(self, presence: Presence, hub: Hub, grace: float) -> None:
        self.presence = presence
        self.hub = hub
        self.grace = grace
        self.views: dict[str, ChannelView] = {}
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.due = math.inf  # loop time of the next look at dirty members
        self.sent = 0  # join and leave messages written, for tests and the benchmark

    # what the hub and the broker tell

    def watch(self, channel: str) -> None:
        if channel not in self.views:
            self.views[channel] = ChannelView()
            self.queue.put_nowait(("load", channel))

    def unwatch(self, channel: str) -> None:
        self.views.pop(channel, None)

    def on_notify(self, payload: str) -> None:
        self.queue.put_nowait(("notice", payload))

    def on_reconnect(self) -> None:
        self.queue.put_nowait(("reload", ""))

    # the one job

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            timeout = None if self.due == math.inf else max(0.0, self.due - loop.time())
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                item = None
            if item is not None:
                try:
                    await self.handle(item, loop.time())
                except DATABASE_DOWN_ERRORS as exc:
                    log.warning("presence view not loaded: %s; retrying", type(exc).__name__)
                    loop.call_later(RETRY, self.queue.put_nowait, item)
                except Exception:
                    log.exception("presence notification not applied")
            if loop.time() >= self.due:
                self.announce(loop.time())

    async def handle(self, item: tuple[str, str], now: float) -> None:
        kind, value = item
        if kind == "notice":
            self.apply(orjson.loads(value), now)
        elif kind == "load":
            await self.load(value, now)
        elif kind == "reload":
            for channel in list(self.views):
                await self.load(channel, now)

    def apply(self, notice: dict, now: float) -> None:
        gone = notice.get("gone")
        if gone:
            if self.presence.process in gone:
                self.presence.lost()  # swept while it could not beat: write everything again now
            for view in self.views.values():
                for member, processes in list(view.holders.items()):
                    if any(process in processes for process in gone):
                        for process in gone:
                            processes.pop(process, None)
                        if not processes:
                            del view.holders[member]
                        view.mark(member, now)
        else:
            process = notice["p"]
            for channel, member, username, count in notice["e"]:
                view = self.views.get(channel)
                if view is not None:
                    view.set(member, process, username, count, now)
        self.due = min(self.due, now + TICK)

    async def load(self, channel: str, now: float) -> None:
        rows = await self.presence.entries(channel)
        view = self.views.get(channel)
        if view is not None:
            view.replace(rows, now)
            self.due = min(self.due, now + TICK)

    def announce(self, now: float) -> None:
        """Tell subscribers what changed since they were last told; absences younger than the grace
        wait. Everything a tick decides for a channel goes to each subscriber in one write."""
        due = math.inf
        for channel, view in self.views.items():
            notices: list[tuple[str, EncodedNotice]] = []
            for member in list(view.dirty):
                if member in view.holders:
                    del view.dirty[member]
                    if member not in view.announced:
                        view.announced.add(member)
                        notices.append(notice(channel, "join", member, view.usernames.get(member, "")))
                    continue
                since = view.absent_since.get(member, now)
                if member in view.announced and now - since < self.grace:
                    due = min(due, since + self.grace)
                    continue
                del view.dirty[member]
                view.absent_since.pop(member, None)
                username = view.usernames.pop(member, "")
                if member in view.announced:
                    view.announced.discard(member)
                    notices.append(notice(channel, "leave", member, username))
            if notices:
                self.sent += self.hub.announce(channel, notices)
        self.due = due


def notice(channel: str, op: str, member: str, username: str) -> tuple[str, EncodedNotice]:
    return member, EncodedNotice.of({"op": op, "channel": channel, "user": {"id": member, "username": username}})
