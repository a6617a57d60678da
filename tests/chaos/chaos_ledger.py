"""The frame accounting of a chaos run: three exact ledgers, and the end-to-end equation they make.

1. **Bot -> its socket.** Every frame a session's transmit lane counts as sent (``frames_sent`` +
   ``silence_sent``) is a datagram the kernel accepted on that bot's socket: ``lane == socket``.
2. **Socket -> media server.** Every RTP datagram a bot's sockets sent reached a media server and was either
   accepted or dropped with a counter (``before_speaking``, ``paused``, ``unknown_address`` after a rejoin or
   a move, ...), per SSRC: ``sent == accepted + sum(dropped by reason) + kernel drops at the server socket``.
   The frames "in flight at the instant of a fault" are not excluded: they are the ones the server counted
   as ``unknown_address``/``before_select_protocol`` (sent on a socket whose session just ended) or
   ``before_speaking`` (sent before the server bound the new SSRC).
3. **Media server -> recorder.** For each recording participant: the copies the server sealed for it
   (``forwarded``, per sender SSRC and sequence number, from the tap; equal to the server's own
   ``forwarded_to_client``) minus impairment losses plus impairment duplicates minus kernel drops on its
   socket
   equals what its socket received, and that splits into recorded frames, DAVE-undecryptable frames (epoch
   changes), packets before its key, transport failures, RTCP, packets still held for an SSRC nobody has
   named, and packets dropped from that bounded hold.
   ``recorded == forwarded - lost + duplicated - kernel - dave_failed - before_key - undecryptable
   - rtcp - held - hold_dropped``.

Joined, for every recorder: frames recorded = frames the bots sent while it was listening (the forwarded
copies, each traced back to a datagram a bot's socket sent, ledgers 1-2) minus the losses counted above.
And no phantoms: every recorded frame's (SSRC, sequence) was sent by the bot it is attributed to and
forwarded to that recorder.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .chaos_taps import udp_drops
from .chaos_world import ChaosWorld


@dataclass
class Ledger:
    lane_vs_socket: dict[int, tuple[int, int]] = field(default_factory=dict)
    sent_rtp: Counter[int] = field(default_factory=Counter)
    """SSRC -> RTP datagrams the bots' sockets sent."""
    sfu_rtp: dict[int, Counter[str]] = field(default_factory=dict)
    """SSRC -> outcome -> RTP datagrams the media servers received."""
    sfu_kernel_drops: int = 0
    recorders: list[dict[str, Any]] = field(default_factory=list)
    phantoms: list[str] = field(default_factory=list)
    totals: Counter[str] = field(default_factory=Counter)

    def problems(self) -> list[str]:
        out = []
        for bot, (lane, sock) in sorted(self.lane_vs_socket.items()):
            if lane != sock:
                out.append(f"bot {bot}: the lane counted {lane} frames sent, its sockets sent {sock}")
        unseen = 0
        for ssrc, sent in self.sent_rtp.items():
            seen = sum(self.sfu_rtp.get(ssrc, Counter()).values())
            if seen > sent:
                out.append(f"SSRC {ssrc}: the servers saw {seen} datagrams, the bot sent {sent}")
            unseen += sent - seen
        if unseen != self.sfu_kernel_drops:
            out.append(
                f"{unseen} RTP datagrams sent by bots were never seen by a media server; the kernel dropped "
                f"{self.sfu_kernel_drops} at the servers' sockets"
            )
        for recorder in self.recorders:
            if recorder["forwarded_tap"] != recorder["forwarded_server"]:
                out.append(f"recorder {recorder['user']}: tap {recorder['forwarded_tap']} != server count")
            if recorder["arrived"] != recorder["received"]:
                out.append(f"recorder {recorder['user']}: expected {recorder['arrived']} datagrams, "
                           f"its socket received {recorder['received']}: {recorder}")  # fmt: skip
            if recorder["recorded"] != recorder["recorded_expected"]:
                out.append(f"recorder {recorder['user']}: recorded {recorder['recorded']} != {recorder}")
        out.extend(self.phantoms[:20])
        return out


def build_ledger(world: ChaosWorld) -> Ledger:
    ledger = Ledger()
    drops = udp_drops()
    sender_of: dict[int, int] = {}
    sent_seqs: dict[int, Counter[int]] = {}
    for bot in world.bots:
        lane = sum(r.session.stats.frames_sent + r.session.stats.silence_sent for r in bot.sessions)
        sock = sum(s.kinds["rtp"] for s in bot.recorder.sockets)
        ledger.lane_vs_socket[bot.index] = (lane, sock)
        ledger.totals["frames_sent"] += sum(r.session.stats.frames_sent for r in bot.sessions)
        ledger.totals["silence_sent"] += sum(r.session.stats.silence_sent for r in bot.sessions)
        ledger.totals["lane_dropped"] += sum(r.session.stats.frames_dropped for r in bot.sessions)
        for sock in bot.recorder.sockets:
            for ssrc, seqs in sock.rtp_by_ssrc.items():
                ledger.sent_rtp[ssrc] += len(seqs)
                sender_of[ssrc] = bot.user_id
                sent_seqs.setdefault(ssrc, Counter()).update(seqs)
    for tap in world.taps.values():
        ledger.sfu_kernel_drops += drops.get(tap.media.address[1], 0)
        for (ssrc, outcome), count in tap.rtp_outcomes.items():
            if ssrc in sender_of:
                ledger.sfu_rtp.setdefault(ssrc, Counter())[outcome] += count
                ledger.totals[f"sfu_rtp_{outcome}"] += count
    for record in world.listeners:
        participant = record.participant
        user = participant.user_id
        forwarded: Counter[tuple[int, int]] = Counter()
        for tap in world.taps.values():
            forwarded.update(tap.forwarded.get(user, Counter()))
        stats = participant.stats
        lost = record.faults.get("udp_lost", 0)
        duplicated = record.faults.get("udp_duplicated", 0)
        recorded_frames = [f for frames in participant._frames.values() for f in frames]
        dave_failed = sum(stats.dave_undecryptable.values())
        forwarded_total = sum(forwarded.values())
        arrived = forwarded_total - lost + duplicated - record.kernel_drops
        entry = {
            "user": user,
            "guild": record.guild_index,
            "joined": round(record.joined, 2),
            "retired": None if record.retired is None else round(record.retired, 2),
            "forwarded_tap": forwarded_total,
            "forwarded_server": record.endpoint.forwarded_to_client,
            "lost": lost,
            "duplicated": duplicated,
            "kernel_drops": record.kernel_drops,
            "arrived": arrived,
            "received": stats.received_packets,
            "recorded": len(recorded_frames),
            "dave_failed": dave_failed,
            "before_key": stats.before_key,
            "transport_undecryptable": stats.transport_undecryptable,
            "rtcp": stats.rtcp,
            "held_unmapped": record.unmapped_held,
            "unmapped_dropped": stats.unmapped_dropped,
        }
        entry["recorded_expected"] = (
            arrived
            - dave_failed
            - stats.before_key
            - stats.transport_undecryptable
            - stats.rtcp
            - record.unmapped_held
            - stats.unmapped_dropped
        )
        ledger.recorders.append(entry)
        for key in ("forwarded_tap", "lost", "duplicated", "kernel_drops", "recorded", "dave_failed",
                    "before_key", "transport_undecryptable", "held_unmapped",
                    "unmapped_dropped"):  # fmt: skip
            ledger.totals[f"recorders_{key}"] += entry[key]
        seen: Counter[tuple[int, int]] = Counter((f.ssrc, f.sequence) for f in recorded_frames)
        for frame in recorded_frames:
            key = (frame.ssrc, frame.sequence)
            if sender_of.get(frame.ssrc) != frame.user_id:
                ledger.phantoms.append(f"recorder {user}: frame {key} attributed to {frame.user_id}")
            elif not sent_seqs[frame.ssrc][frame.sequence]:
                ledger.phantoms.append(f"recorder {user}: frame {key} was never sent")
            elif seen[key] > forwarded[key] * (2 if duplicated else 1):
                ledger.phantoms.append(f"recorder {user}: frame {key} recorded {seen[key]} times")
    return ledger
