# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Console sessions as the event source knows them: which are open on one hypervisor, whether
each has passed ``initialize``, how long it lasted (and whether that length is exact, or only a
bound because the source did not see the session begin or end), and how a snapshot of the
clients QEMU reports is reconciled with that knowledge after a (re)connection.

A session is one client. A VNC client is one TCP connection: one channel, the session's
primary. A SPICE client opens a channel per function (main, display, inputs, cursor, ...), each
its own TCP connection with its own graphics events; libvirt's live events do not say which
client a channel belongs to. Live SPICE channels are grouped by domain and client address: the
first channel of an address with no open session on that domain opens one (it is the main
channel: a SPICE client always links it first) and is its primary; the address's later channels
join it while it has a channel open. When the address already has an open session, the channel
may be another client's (one that replaces the first, or a second client behind the same NAT):
the source then asks QEMU (``query-spice``) and passes what it says (``SpiceChannel``): a main
channel always opens a session of its own, which the address's later channels join, and a
channel whose ``connection-id`` is known joins that client's session. A snapshot regroups every
channel exactly.

Every disconnect says what ended it (``ended_by``): ``client`` for a disconnect libvirt reported,
or a session a snapshot found gone from a domain that still runs; ``domain`` for the sessions of
a domain that stopped (libvirt reports no disconnect then: destroyed, shut down, saved, crashed,
migrated away), whether a lifecycle event said so or a snapshot found the domain gone.
"""

from __future__ import annotations

from typing import AbstractSet, Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple

# (domain, local, remote, auth_scheme, subject) as last seen
Details = Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any], str, List[Any]]
# (local, remote) of one channel
ChannelAddresses = Tuple[Dict[str, Any], Dict[str, Any]]
# (session id, the payload's session mapping, details, protocol) for each event a snapshot yields
SnapshotEntry = Tuple[str, Dict[str, Any], Details, str]


class SpiceChannel(NamedTuple):
    """What QEMU's ``query-spice`` says of one live channel: its ``channel-type`` (1 is the
    main channel, one per client) and its client's ``connection-id``."""

    channel_type: int
    connection_id: int


SPICE_MAIN = 1  # channel-type of a SPICE client's main channel


class PresentClient(NamedTuple):
    """One client a snapshot found: its primary channel's details, its protocol, the ids of all
    its channels (the primary's id, which is the session id, first) and, in the same order, each
    channel's (local, remote) addresses (a domain's end reports every channel's disconnect)."""

    details: Details
    protocol: str
    channels: Sequence[str]
    addresses: Sequence[ChannelAddresses] = ()


class OpenSession:
    """What is remembered of an open session: enough to report its disconnect later.
    ``start_seen``: the source saw its ``connect`` live, so ``started`` is when it began."""

    __slots__ = ("started", "authenticated", "details", "start_seen", "protocol", "primary", "channels", "group",
                 "addresses", "connection_id")

    def __init__(self, started: float, authenticated: bool, details: Details, start_seen: bool, protocol: str,
                 primary: str, group: tuple[str, str] | None) -> None:
        self.started = started
        self.authenticated = authenticated
        self.details = details
        self.start_seen = start_seen
        self.protocol = protocol
        self.primary = primary  # the id of the channel that opened the session
        self.channels: set[str] = {primary}  # the ids of its open channels
        self.group = group  # SPICE: (domain uuid, client address), the key live channels join by
        # the (local, remote) of each open channel but the primary (whose are in details): what
        # the disconnects a domain's end stands for report. Empty for VNC, so its events pay nothing.
        self.addresses: dict[str, ChannelAddresses] = {}
        self.connection_id: int | None = None  # SPICE: QEMU's connection-id of the client, once asked


def _group_of(protocol: str, details: Details) -> tuple[str, str] | None:
    if protocol != "spice":
        return None
    return (str(details[0].get("uuid", "")), str(details[2].get("node", "")))


def _runs(domain: Mapping[str, Any], running: Mapping[str, int]) -> bool:
    """Whether the domain run a session belongs to still runs: its UUID is among the running
    domains, with the same id (libvirt gives every start a new id, so a domain stopped and
    started again while the source was away ended its sessions too)."""
    dom_id = running.get(str(domain.get("uuid", "")))
    return dom_id is not None and domain.get("id", dom_id) == dom_id


class SessionTracker:
    """The open sessions of one hypervisor, keyed by session id, and their open channels."""

    def __init__(self) -> None:
        self.sessions: dict[str, OpenSession] = {}
        self.channel_sessions: dict[str, str] = {}  # open channel id -> its session's id
        self.spice_groups: dict[tuple[str, str], str] = {}  # (domain uuid, client address) -> session id
        # (domain uuid, client address, connection-id) -> session id, of the clients QEMU was asked about
        self.spice_connections: dict[tuple[str, str, int], str] = {}
        # (domain uuid, client address) -> every open session of it, oldest first (usually one)
        self.group_members: dict[tuple[str, str], list[str]] = {}

    def ids_on_domains(self, uuids: AbstractSet[str]) -> set[str]:
        """The ids of the open sessions on the domains whose UUIDs are ``uuids``."""
        return {sid for sid, session in self.sessions.items() if session.details[0].get("uuid") in uuids}

    def __len__(self) -> int:
        return len(self.sessions)

    def protocol_of_channel(self, channel_id: str) -> str | None:
        """The protocol of an open channel the tracker knows, else None."""
        session_id = self.channel_sessions.get(channel_id)
        return None if session_id is None else self.sessions[session_id].protocol

    def spice_group_open(self, domain_uuid: str, node: str) -> bool:
        """Whether a SPICE channel from ``node`` on the domain would join an open session: the
        case where QEMU is worth asking which client the channel is (``SpiceChannel``)."""
        return (domain_uuid, node) in self.spice_groups

    def channel_open(self, channel_id: str) -> bool:
        return channel_id in self.channel_sessions

    def _open(self, channel_id: str, now: float, details: Details, protocol: str, start_seen: bool,
              authenticated: bool, spice: SpiceChannel | None = None) -> tuple[OpenSession, str]:
        """The session a channel that was not open belongs to: the open SPICE session of its
        client (``spice``, what QEMU said of it) or of its group, or a new one it is the primary
        of (a main channel always is)."""
        group = _group_of(protocol, details)
        if group is not None and not (spice is not None and spice.channel_type == SPICE_MAIN):
            session_id = None
            if spice is not None:
                session_id = self.spice_connections.get((*group, spice.connection_id))
            if session_id is None:
                session_id = self.spice_groups.get(group)
            if session_id is not None:
                session = self.sessions[session_id]
                session.channels.add(channel_id)
                session.addresses[channel_id] = (details[1], details[2])
                self.channel_sessions[channel_id] = session_id
                if spice is not None and session.connection_id is None:
                    self._know_connection(session_id, session, spice.connection_id)
                return session, session_id
        session = OpenSession(now, authenticated, details, start_seen, protocol, channel_id, group)
        self.sessions[channel_id] = session
        self.channel_sessions[channel_id] = channel_id
        if group is not None:
            self.spice_groups[group] = channel_id
            self.group_members.setdefault(group, []).append(channel_id)
            if spice is not None:
                self._know_connection(channel_id, session, spice.connection_id)
        return session, channel_id

    def _know_connection(self, session_id: str, session: OpenSession, connection_id: int) -> None:
        """Remember QEMU's connection-id of a SPICE session (one with a group)."""
        if session.group is None:
            return
        session.connection_id = connection_id
        self.spice_connections[(*session.group, connection_id)] = session_id

    def _close(self, session_id: str) -> OpenSession:
        session = self.sessions.pop(session_id)
        for channel_id in session.channels:
            self.channel_sessions.pop(channel_id, None)
        if session.group is not None:
            members = self.group_members.get(session.group, [])
            if session_id in members:
                members.remove(session_id)
            if self.spice_groups.get(session.group) == session_id:
                # another open session of the address (a client the closed one replaced) takes it back
                if members:
                    self.spice_groups[session.group] = members[-1]
                else:
                    del self.spice_groups[session.group]
            if not members:
                self.group_members.pop(session.group, None)
            if session.connection_id is not None:
                self.spice_connections.pop((*session.group, session.connection_id), None)
        return session

    def observe(self, channel_id: str, phase: str, now: float, details: Details,
                protocol: str = "vnc", spice: SpiceChannel | None = None) -> tuple[str, dict[str, Any]]:
        """Record a live event of the channel ``channel_id`` (a hash of where the connection is);
        return the session's id and the payload's ``session`` mapping for it. ``spice``: what
        QEMU said of a SPICE channel that is not open yet (its type and client)."""
        subject = details[4]
        session_id = self.channel_sessions.get(channel_id)
        if phase in ("connect", "initialize"):
            # a connect again on an open lone channel (its disconnect was missed) is a new session
            if session_id is not None and phase == "connect" and self.sessions[session_id].channels == {session_id}:
                self._close(session_id)
                session_id = None
            if session_id is None:
                session, session_id = self._open(channel_id, now, details, protocol,
                                                 start_seen=phase == "connect", authenticated=False, spice=spice)
            else:
                session = self.sessions[session_id]
            primary = channel_id == session.primary
            if phase == "initialize" and primary:
                session.authenticated = True
                session.details = details
            return session_id, {"id": session_id, "authenticated": session.authenticated, "primary": primary,
                                "channels": len(session.channels)}
        # disconnect (and any phase libvirt may add later) ends the channel
        if session_id is None:
            group = _group_of(protocol, details)
            owner = self.spice_groups.get(group) if group is not None else None
            if owner is not None:  # a channel of an open client that opened before the source saw it
                known = self.sessions[owner]
                return owner, {"id": owner, "authenticated": known.authenticated, "primary": False,
                               "channels": len(known.channels), "ended_by": "client"}
            # Began before the source saw it and no snapshot told us: libvirt repeats the
            # subject on the disconnect of an authenticated session only.
            return channel_id, {"id": channel_id, "authenticated": bool(subject), "primary": True, "channels": 0,
                                "duration_s": None, "duration_exact": False, "ended_by": "client"}
        session = self.sessions[session_id]
        session.channels.discard(channel_id)
        self.channel_sessions.pop(channel_id, None)
        mapping: dict[str, Any] = {"id": session_id, "authenticated": session.authenticated,
                                   "primary": channel_id == session.primary, "channels": len(session.channels)}
        if mapping["primary"]:
            mapping["duration_s"] = round(now - session.started, 3)
            mapping["duration_exact"] = session.start_seen  # else a lower bound: it began earlier
        elif session.addresses:
            session.addresses.pop(channel_id, None)
        mapping["ended_by"] = "client"
        if not session.channels:
            self._close(session_id)
        return session_id, mapping

    def end_domain(self, domain_uuid: str, now: float) -> list[SnapshotEntry]:
        """Close every open session of the domain ``domain_uuid``, which stopped at ``now``: the
        disconnect of each open channel, as libvirt reports a client's (for SPICE the other
        channels first and the primary last, so the last disconnect has ``channels`` 0 and the
        primary's carries the session's duration), with ``ended_by: domain``. Returns
        ``(session_id, session mapping, details of that channel, protocol)`` per disconnect."""
        ended: list[SnapshotEntry] = []
        for session_id in [sid for sid, s in self.sessions.items() if s.details[0].get("uuid") == domain_uuid]:
            session = self._close(session_id)
            order = sorted(channel for channel in session.channels if channel != session.primary)
            if session.primary in session.channels:  # a SPICE main channel may have left first
                order.append(session.primary)
            domain, local, remote, auth_scheme, subject = session.details
            if session.protocol == "spice":
                auth_scheme = ""  # QEMU names no auth scheme on a SPICE disconnect
            for left, channel_id in enumerate(order, start=1):
                mapping: dict[str, Any] = {"id": session_id, "authenticated": session.authenticated,
                                           "primary": channel_id == session.primary, "channels": len(order) - left}
                if mapping["primary"]:
                    mapping["duration_s"] = round(now - session.started, 3)
                    mapping["duration_exact"] = session.start_seen  # the end was seen live
                    addresses = (local, remote)
                else:
                    addresses = session.addresses.get(channel_id, (local, remote))
                mapping["ended_by"] = "domain"
                ended.append((session_id, mapping, (domain, addresses[0], addresses[1], auth_scheme, subject),
                              session.protocol))
        return ended

    def reconcile(self, present: Mapping[str, PresentClient], now: float, touched: AbstractSet[str] = frozenset(),
                  running: Mapping[str, int] | None = None) -> tuple[list[SnapshotEntry], list[SnapshotEntry]]:
        """Merge a snapshot into the tracker.

        ``present`` maps session id -> every client QEMU reports now. Sessions with a live event
        since the snapshot was taken (``touched``) are left to those live events. Returns
        ``(initialized, gone)``: lists of ``(session_id, session mapping, details, protocol)``
        for the snapshot ``initialize`` and ``disconnect`` events to emit, in a stable order.
        The snapshot's grouping of channels replaces the live one.

        A session that is gone ended at some moment before ``now`` that the source did not see
        (it was not connected, or not listening): its ``duration_s`` runs to ``now``, an upper
        bound, hence ``duration_exact`` false. ``running`` maps the UUID of every domain running
        at the snapshot to its id: a gone session whose domain run is not among them was ended by
        the domain (``ended_by: domain``), any other by its client. Without ``running`` (not
        known), ``client``.
        """
        initialized: list[SnapshotEntry] = []
        for session_id, client in present.items():
            if session_id in touched:
                continue
            session = self.sessions.get(session_id)
            if session is None:
                session = OpenSession(now, True, client.details, False, client.protocol, session_id,
                                      _group_of(client.protocol, client.details))
                self.sessions[session_id] = session
            self._regroup(session_id, session, client)
            session.authenticated = True
            if client.details[4] or not session.details[4]:
                session.details = client.details
            initialized.append((session_id, {"id": session_id, "authenticated": True, "primary": True,
                                             "channels": len(session.channels)}, session.details, session.protocol))
        gone: list[SnapshotEntry] = []
        for session_id in [sid for sid in self.sessions if sid not in present and sid not in touched]:
            session = self._close(session_id)
            gone.append((
                session_id,
                {"id": session_id, "authenticated": session.authenticated, "primary": True, "channels": 0,
                 "duration_s": round(now - session.started, 3), "duration_exact": False,
                 "ended_by": "client" if running is None or _runs(session.details[0], running) else "domain"},
                session.details,
                session.protocol,
            ))
        return initialized, gone

    def _regroup(self, session_id: str, session: OpenSession, client: PresentClient) -> None:
        """Give ``session`` exactly the snapshot's channels of ``client``, taking them from any
        session the live grouping had put them in."""
        channels = client.channels
        for channel_id in session.channels - set(channels):
            if self.channel_sessions.get(channel_id) == session_id:
                del self.channel_sessions[channel_id]
        session.channels = set(channels) or {session_id}
        session.addresses = {channel_id: addresses for channel_id, addresses in zip(channels, client.addresses)
                             if channel_id != session_id}
        for channel_id in session.channels:
            previous = self.channel_sessions.get(channel_id)
            if previous is not None and previous != session_id and previous in self.sessions:
                self.sessions[previous].channels.discard(channel_id)
                self.sessions[previous].addresses.pop(channel_id, None)
            self.channel_sessions[channel_id] = session_id
        if session.group is not None:
            self.spice_groups[session.group] = session_id
            members = self.group_members.setdefault(session.group, [])
            if session_id not in members:
                members.append(session_id)
