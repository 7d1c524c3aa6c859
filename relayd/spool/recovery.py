"""Recovery at open: rebuild the in-memory index of a spool directory, quarantine what is bad.

Opening never fails because of file contents, only because the directory is
unusable (the Vector crash loop this avoids: one corrupt byte must not stop
a daemon from starting).  `recover` reads and CRC-checks every segment once
(~1 s per million records) and repairs what a crash or disk rot left:

1. ``meta.json`` missing, unparseable or failing its CRC -> replay from the
   oldest segment (duplicates, no loss).  A cursor that is not a record
   boundary -> replay its segment from the start.  A cursor naming a
   segment that no longer exists means that segment was fully
   acknowledged: start at the next one.
2. Segments older than the cursor (their deletion was lost in a crash) are
   deleted; empty segments other than the newest are deleted.
3. A bad frame (length < 8, > 64 MiB, past the end, or CRC mismatch) starts
   a forward scan (`relayd.spool.scan`) for the next valid frame.  Nothing
   valid after it in the **newest** segment -> torn tail, truncated (a
   write that never completed; appends then resume on a record boundary).
   Otherwise the range is copied to ``quarantine/<segment>-<offset>.bad``
   (`quarantine`, also used by `Spool.read` for rot that appears after
   open), counted, and skipped; later records are served.

`recover` returns a `RecoveredLog`; the `Spool` adopts it as its index and
persists the cursor if recovery moved it.
"""

from __future__ import annotations

import os
from typing import Dict, List

import attrs
from twisted.logger import Logger

from relayd.spool.meta import META_NAME, META_TMP_NAME, load_meta
from relayd.spool.scan import RESYNC_MIN_BOUND, scan_bytes
from relayd.spool.segments import SEGMENT_SUFFIX, list_segments, read_file, segment_name, truncate_file, unlink_segment

__all__ = ["QUARANTINE_DIR", "RecoveredLog", "recover", "quarantine"]

QUARANTINE_DIR = "quarantine"


@attrs.define
class RecoveredLog:
    """The index of a spool directory as recovery left it (the `Spool`'s starting state)."""

    # Segment sequence numbers, ascending, and per segment its size in bytes
    # (on a record boundary), its number of valid records and its known bad
    # ranges ({start: end}, which reads jump over).
    seqs: List[int] = attrs.field(factory=list)
    sizes: Dict[int, int] = attrs.field(factory=dict)
    counts: Dict[int, int] = attrs.field(factory=dict)
    bad: Dict[int, Dict[int, int]] = attrs.field(factory=dict)
    next_seq: int = 0
    # The read cursor: segment, offset, records before offset in that segment.
    rseq: int = 0
    roff: int = 0
    ridx: int = 0
    acked_total: int = 0
    corrupt: int = 0
    torn_bytes: int = 0
    resync_bound: int = RESYNC_MIN_BOUND
    # The directory changed (files deleted or quarantined): owes an fsync.
    dir_dirty: bool = False
    # The cursor moved away from what meta.json says: it must be rewritten.
    meta_changed: bool = False


def quarantine(path: str, seq: int, start: int, data: bytes, durable: bool, log: Logger) -> bool:
    """Keep a copy of a corrupt range's bytes for forensics; True if a file was created.

    Best effort: the bytes stay in the segment anyway, so a failure is only
    logged.  The caller counts the range and owes a directory fsync when
    this returns True.
    """
    qdir = os.path.join(path, QUARANTINE_DIR)
    name = os.path.join(qdir, "%s-%d.bad" % (segment_name(seq)[: -len(SEGMENT_SUFFIX)], start))
    log.error(
        "spool {path}: corrupt range at segment {seq} offset {start} ({n} bytes) quarantined as {name}",
        path=path,
        seq=seq,
        start=start,
        n=len(data),
        name=name,
    )
    if os.path.exists(name):
        return False  # quarantined by an earlier run
    try:
        os.makedirs(qdir, exist_ok=True)
        tmp = name + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, name)
        return True
    except OSError as e:
        log.error("spool {path}: cannot write quarantine file: {err}", path=path, err=e)
        return False


def recover(path: str, durable: bool, log: Logger) -> RecoveredLog:
    """Scan and repair the (locked) spool directory ``path``; see the module docstring.

    ``durable`` (the fsync policy is not ``"never"``) fsyncs truncations and
    quarantine copies.  Raises OSError only if the directory is unusable.
    """
    out = RecoveredLog()
    try:
        os.unlink(os.path.join(path, META_TMP_NAME))
    except FileNotFoundError:
        pass
    names = list_segments(path)
    seqs = sorted(names)
    meta = load_meta(path)
    changed = False
    if meta is None:
        if seqs or os.path.exists(os.path.join(path, META_NAME)):
            log.warn(
                "spool {path}: metadata missing or invalid; replaying from the oldest segment",
                path=path,
            )
        rseq, roff = (seqs[0] if seqs else 0), 0
        out.acked_total = 0
        changed = True
    else:
        rseq, roff, out.acked_total = meta
    # Segments before the cursor were fully acknowledged; their deletion
    # just had not reached the disk.
    for seq in [s for s in seqs if s < rseq]:
        unlink_segment(path, seq, log)
        out.dir_dirty = True
        seqs.remove(seq)
        changed = True
    out.next_seq = max([rseq] + [s + 1 for s in seqs])
    if rseq not in names:
        # The cursor's segment was deleted (fully acknowledged).
        rseq, roff = (seqs[0] if seqs else out.next_seq), 0
        changed = True
    ridx = 0
    last = seqs[-1] if seqs else None
    for seq in seqs:
        fname = os.path.join(path, names[seq])
        try:
            buf = read_file(fname)
        except OSError as e:
            # Unreadable file: nothing in it can be served.  Leave it for
            # an operator, count it, carry on with the next segment.
            log.error("spool {path}: cannot read segment {seq}: {err}", path=path, seq=seq, err=e)
            out.corrupt += 1
            out.sizes[seq] = 0
            out.counts[seq] = 0
            out.bad[seq] = {}
            out.seqs.append(seq)
            continue
        mark = roff if seq == rseq else 0
        scan = scan_bytes(buf, mark, out.resync_bound)
        out.resync_bound = max(out.resync_bound, scan.largest)
        size = len(buf)
        tail = scan.tail
        if tail is not None:
            if seq == last:
                # Torn tail of the newest segment: a write that never
                # completed.  Cut it off so appends resume on a boundary.
                out.torn_bytes += size - tail
                truncate_file(fname, tail, durable)
                size = tail
                if seq == rseq and roff > size:
                    # The cursor had acknowledged past what survived.
                    roff = size
                    scan = scan_bytes(buf[:size], roff, out.resync_bound)
            else:
                scan.bad.append((tail, size))
        if seq == rseq:
            if scan.mark_index is None:
                log.warn(
                    "spool {path}: read cursor {seq}:{off} is not a record boundary; "
                    "replaying the segment from its start",
                    path=path,
                    seq=seq,
                    off=roff,
                )
                roff, ridx, changed = 0, 0, True
            else:
                ridx = scan.mark_index
        if size == 0 and seq != last:
            unlink_segment(path, seq, log)
            out.dir_dirty = True
            if seq == rseq:
                rseq = seq + 1
                roff = ridx = 0
                changed = True
            continue
        out.sizes[seq] = size
        out.counts[seq] = scan.records
        out.bad[seq] = dict(scan.bad)
        out.seqs.append(seq)
        for start, end in scan.bad:
            if seq > rseq or start >= roff:
                out.corrupt += 1
                if quarantine(path, seq, start, buf[start:end], durable, log):
                    out.dir_dirty = True
    if out.seqs and rseq < out.seqs[0]:
        rseq, roff, ridx = out.seqs[0], 0, 0
    out.rseq, out.roff, out.ridx = rseq, roff, ridx
    out.meta_changed = changed
    return out
