"""Tests for relayd.spool (record, meta, segments, recovery, spool): framing, the entry codec, the Spool API, recovery and full disks."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relayd.spool import meta as meta_mod
from relayd.spool import segments as segments_mod
from relayd.spool.errors import SpoolClosedError, SpoolDirectoryError, SpoolFull, SpoolLockedError, SpoolWriteError
from relayd.spool.record import (
    FRAME_OVERHEAD,
    MAX_PAYLOAD_BYTES,
    decode_entry,
    decode_record,
    encode_entry,
    encode_record,
)
from relayd.spool.spool import Spool
from tests.strategies import spool_entries, spool_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    """A settable clock: tests never read the wall clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def segment_files(path):
    """Full paths of the segment files in ``path``, oldest first."""
    return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".seg")]


def read_all(sp, batch=7):
    """Every pending payload, in order, read in pipelined batches without acking."""
    out = []
    after = None
    while True:
        recs = sp.read(batch, 1 << 30, after=after)
        if not recs:
            return out
        out.extend(p for _, p in recs)
        after = recs[-1][0]


def flip_byte(path, offset):
    """Invert one byte of a file in place (what bit rot or a stray write does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


class SpoolTestCase(SynchronousTestCase):
    """Base: a fresh temporary directory per test and a tracked opener."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="spooltest-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.dir = os.path.join(self.base, "spool")
        self.clock = FakeClock()

    def open(self, **kw):
        """Open the test spool with small defaults; closed at cleanup."""
        kw.setdefault("max_bytes", 1 << 20)
        kw.setdefault("segment_bytes", 256)
        kw.setdefault("clock", self.clock)
        sp = Spool.open(kw.pop("path", self.dir), **kw)
        self.addCleanup(sp.close)
        return sp


class FramingTests(SynchronousTestCase):
    """Record framing and the entry codec are lossless and detect damage."""

    @given(st.lists(spool_records(), max_size=20))
    def test_records_round_trip(self, records):
        """Concatenated frames decode back to the same (timestamp, payload) sequence.

        Segments are exactly such concatenations, so this is the on-disk format.
        """
        buf = b"".join(encode_record(p, ts) for ts, p in records)
        out = []
        off = 0
        while off < len(buf):
            decoded = decode_record(buf, off)
            self.assertIsNotNone(decoded)
            ts, payload, off = decoded
            out.append((ts, payload))
        self.assertEqual(out, records)
        self.assertEqual(len(buf), sum(len(p) + FRAME_OVERHEAD for _, p in records))

    @given(spool_records(), st.data())
    def test_any_damaged_byte_is_detected(self, record, data):
        """Changing any byte of a frame makes it fail to decode, so recovery never serves it."""
        ts, payload = record
        frame = bytearray(encode_record(payload, ts))
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= data.draw(st.integers(1, 255))
        decoded = decode_record(bytes(frame), 0)
        if decoded is not None:
            # Only possible if the length shrank onto a CRC-valid prefix: never the original.
            self.assertNotEqual(decoded[:2], (ts, payload))

    @given(spool_records(), st.integers(0, 1 << 20))
    def test_truncated_frame_is_not_a_record(self, record, cut):
        """A frame cut short (torn write) never decodes."""
        ts, payload = record
        frame = encode_record(payload, ts)
        cut = cut % len(frame)
        self.assertIsNone(decode_record(frame[:cut], 0))

    @given(spool_entries())
    def test_entry_round_trip(self, entry):
        """encode_entry/decode_entry is lossless for any key and item bytes."""
        key, item = entry
        self.assertEqual(decode_entry(encode_entry(key, item)), (key, item))

    @given(st.binary(max_size=12))
    def test_entry_decode_rejects_or_parses(self, blob):
        """Arbitrary bytes either decode to parts that re-encode to the same bytes or raise ValueError."""
        try:
            key, item = decode_entry(blob)
        except ValueError:
            return
        self.assertEqual(encode_entry(key, item), blob)


class SpoolAPITests(SpoolTestCase):
    """The public API under normal operation."""

    def test_append_read_ack_in_order(self):
        """Records come back in append order, and ack consumes exactly up to a position."""
        sp = self.open()
        payloads = [b"r%d" % i for i in range(50)]
        sp.append(payloads[:20])
        sp.append(payloads[20:])
        self.assertEqual(sp.pending_records, 50)
        first = sp.read(10, 1 << 20)
        self.assertEqual([p for _, p in first], payloads[:10])
        self.assertEqual(sp.read(10, 1 << 20), first, "read does not consume")
        sp.ack(first[4][0])
        self.assertEqual(sp.pending_records, 45)
        self.assertEqual(read_all(sp), payloads[5:])

    def test_read_after_pipelines(self):
        """read(after=pos) continues past an unacknowledged batch, so several batches can be in flight."""
        sp = self.open()
        sp.append([b"%d" % i for i in range(30)])
        a = sp.read(10, 1 << 20)
        b = sp.read(10, 1 << 20, after=a[-1][0])
        self.assertEqual([p for _, p in b], [b"%d" % i for i in range(10, 20)])
        sp.ack(b[-1][0])  # cumulative
        self.assertEqual(sp.pending_records, 10)
        # An `after` behind the cursor starts at the cursor.
        self.assertEqual(sp.read(1, 1 << 20, after=a[0][0])[0][1], b"20")

    def test_positions_are_ordered(self):
        """Positions compare in log order, across segment boundaries too."""
        sp = self.open(segment_bytes=64)
        sp.append([b"x" * 20 for _ in range(10)])
        positions = [pos for pos, _ in sp.read(100, 1 << 20)]
        self.assertEqual(positions, sorted(positions))
        self.assertEqual(len(set(positions)), 10)
        self.assertGreater(sp.segment_count, 1)

    def test_read_limits(self):
        """max_records and max_bytes bound a batch, but one oversized record still comes out."""
        sp = self.open(segment_bytes=1 << 20)
        sp.append([b"a" * 100] * 10 + [b"b" * 5000])
        self.assertEqual(len(sp.read(3, 1 << 20)), 3)
        self.assertEqual(len(sp.read(100, 250)), 2)
        big = sp.read(5, 10, after=sp.read(10, 1 << 20)[-1][0])
        self.assertEqual([p for _, p in big], [b"b" * 5000])

    def test_large_record_beyond_read_chunk(self):
        """A record larger than one pread chunk is read whole."""
        sp = self.open(segment_bytes=1 << 20, max_bytes=64 << 20)
        big = os.urandom(6 * 1024 * 1024)
        sp.append([b"small", big, b"after"])
        self.assertEqual(read_all(sp, batch=1), [b"small", big, b"after"])

    def test_records_never_span_segments(self):
        """Each segment holds whole records and stays within segment_bytes unless one record is bigger."""
        sp = self.open(segment_bytes=100)
        sp.append([b"y" * 30, b"y" * 30, b"z" * 200, b"y" * 10])
        sizes = [os.path.getsize(f) for f in segment_files(self.dir)]
        self.assertEqual(sizes, [92, 216, 26])
        for f in segment_files(self.dir):
            with open(f, "rb") as fh:
                buf = fh.read()
            off = 0
            while off < len(buf):
                off = decode_record(buf, off)[2]
            self.assertEqual(off, len(buf))

    def test_payload_too_large(self):
        """A payload over MAX_PAYLOAD_BYTES is refused before anything is written."""
        sp = self.open()

        class Huge(bytes):
            def __len__(self):
                return MAX_PAYLOAD_BYTES + 1

        self.assertRaises(ValueError, sp.append, [b"ok", Huge()])
        self.assertEqual(sp.pending_records, 0)

    def test_spool_full_is_all_or_nothing(self):
        """SpoolFull leaves the spool untouched, then space freed by acks is reusable."""
        sp = self.open(max_bytes=500, segment_bytes=100)
        rec = b"q" * 34  # 50 bytes framed
        sp.append([rec] * 9)
        self.assertRaises(SpoolFull, sp.append, [rec, rec])
        self.assertEqual(sp.pending_records, 9)
        self.assertEqual(sp.disk_bytes, 450)
        recs = sp.read(100, 1 << 20)
        sp.ack(recs[1][0])  # first segment (2 records) fully acked -> deleted
        self.assertEqual(sp.disk_bytes, 350)
        sp.append([rec, rec])
        self.assertEqual(sp.pending_records, 9)

    def test_drained_active_segment_is_reclaimed_for_space(self):
        """When everything was acked, a full active segment does not block appends forever."""
        sp = self.open(max_bytes=200, segment_bytes=1000)
        sp.append([b"w" * 34] * 4)
        sp.ack(sp.read(10, 1 << 20)[-1][0])
        self.assertEqual(sp.pending_records, 0)
        sp.append([b"v" * 34] * 3)
        self.assertEqual(read_all(sp), [b"v" * 34] * 3)

    def test_fully_acked_segments_deleted_only_then(self):
        """A segment file disappears exactly when its last record is acknowledged."""
        sp = self.open(segment_bytes=100)
        sp.append([b"k" * 34] * 6)  # 2 per segment, 3 segments
        recs = sp.read(10, 1 << 20)
        self.assertEqual(len(segment_files(self.dir)), 3)
        sp.ack(recs[0][0])
        self.assertEqual(len(segment_files(self.dir)), 3)
        sp.ack(recs[1][0])
        self.assertEqual(len(segment_files(self.dir)), 2)
        sp.ack(recs[5][0])
        self.assertEqual(len(segment_files(self.dir)), 1, "the active segment is kept for the writer")

    def test_ack_rejects_foreign_positions_and_ignores_old_ones(self):
        """Acking a position the spool never gave out is a bug in the caller; old ones are no-ops."""
        sp = self.open()
        sp.append([b"a", b"b"])
        recs = sp.read(2, 100)
        sp.ack(recs[1][0])
        sp.ack(recs[0][0])
        self.assertEqual(sp.pending_records, 0)
        self.assertRaises(ValueError, sp.ack, (999, 0, 1))
        self.assertRaises(ValueError, sp.ack, (recs[1][0][0], 10**6, 5))

    def test_restart_preserves_unacked_and_cursor(self):
        """A clean close and reopen keeps unacked records and the acked cursor."""
        sp = self.open(segment_bytes=80)
        sp.append([b"%d" % i for i in range(20)])
        recs = sp.read(7, 1 << 20)
        sp.ack(recs[-1][0])
        sp.close()
        sp = self.open(segment_bytes=80)
        self.assertEqual(sp.pending_records, 13)
        self.assertEqual(read_all(sp), [b"%d" % i for i in range(7, 20)])
        sp.append([b"more"])
        self.assertEqual(read_all(sp)[-1], b"more")

    def test_close_of_drained_spool_leaves_no_segments(self):
        """A fully drained spool deletes its files at close, and numbering continues upward."""
        sp = self.open()
        sp.append([b"a"])
        last_seq = sp.read(1, 10)[0][0][0]
        sp.ack(sp.read(1, 10)[0][0])
        sp.close()
        self.assertEqual(segment_files(self.dir), [])
        sp = self.open()
        sp.append([b"b"])
        self.assertGreater(sp.read(1, 10)[0][0][0], last_seq)

    def test_pending_bytes_and_oldest_timestamp(self):
        """pending_bytes counts framed bytes; oldest_timestamp is the oldest unacked append time."""
        sp = self.open()
        self.assertIsNone(sp.oldest_timestamp)
        self.clock.now = 10.0
        sp.append([b"abc"])
        self.clock.now = 20.0
        sp.append([b"de"])
        self.assertEqual(sp.pending_bytes, 3 + 2 + 2 * FRAME_OVERHEAD)
        self.assertEqual(sp.oldest_timestamp, 10.0)
        sp.ack(sp.read(1, 10)[0][0])
        self.assertEqual(sp.oldest_timestamp, 20.0)
        sp.close()
        self.assertEqual(self.open().oldest_timestamp, 20.0)

    def test_needs_sync_follows_policy(self):
        """needs_sync says when group commit has work: never under "never", never after "always" appends."""
        for policy, expected in (("batch", True), ("always", False), ("never", False)):
            sp = self.open(path=os.path.join(self.base, policy), fsync=policy)
            self.assertFalse(sp.needs_sync)
            sp.append([b"x"])
            self.assertEqual(sp.needs_sync, expected, policy)
            sp.sync()
            self.assertFalse(sp.needs_sync)
            sp.ack(sp.read(1, 10)[0][0])
            self.assertEqual(sp.needs_sync, expected, policy)

    def test_ack_cursor_durable_after_sync(self):
        """Under "batch", the read cursor reaches meta.json at sync(), not before."""
        sp = self.open()
        sp.append([b"a", b"b"])
        sp.sync()
        sp.ack(sp.read(1, 10)[0][0])
        meta_before = meta_mod.load_meta(self.dir)
        sp.sync()
        meta_after = meta_mod.load_meta(self.dir)
        self.assertNotEqual(meta_before, meta_after)
        self.assertEqual(meta_after[2], 1)

    def test_closed_spool_refuses_use(self):
        """Using a closed spool is a clear error, and close is idempotent."""
        sp = self.open()
        sp.close()
        sp.close()
        self.assertRaises(SpoolClosedError, sp.append, [b"x"])
        self.assertRaises(SpoolClosedError, sp.read, 1, 1)

    def test_bad_arguments(self):
        """An unknown fsync policy or a non-positive size is a ValueError."""
        self.assertRaises(ValueError, Spool.open, self.dir, 100, fsync="sometimes")
        self.assertRaises(ValueError, Spool.open, self.dir, 0)


class DirectoryTests(SpoolTestCase):
    """Only an unusable directory stops open()."""

    def test_path_is_a_file(self):
        """A regular file where the directory should be is a SpoolDirectoryError."""
        with open(self.dir, "w") as f:
            f.write("x")
        self.assertRaises(SpoolDirectoryError, Spool.open, self.dir, 1000)

    def test_parent_is_a_file(self):
        """A directory that cannot be created is a SpoolDirectoryError."""
        with open(self.dir, "w") as f:
            f.write("x")
        self.assertRaises(SpoolDirectoryError, Spool.open, os.path.join(self.dir, "sub"), 1000)

    def test_second_open_is_locked_out(self):
        """Two Spools never share a directory; the lock goes with close()."""
        sp = self.open()
        self.assertRaises(SpoolLockedError, Spool.open, self.dir, 1000)
        sp.close()
        self.open()


class RecoveryTests(SpoolTestCase):
    """Recovery at open: torn tails, corruption, odd files, bad metadata."""

    def fill(self, n=12, segment_bytes=100, **kw):
        """Write n numbered 34-byte records (two per 100-byte segment), sync, close."""
        sp = self.open(segment_bytes=segment_bytes, **kw)
        payloads = [b"%02d" % i + b"." * 32 for i in range(n)]
        sp.append(payloads)
        sp.sync()
        sp.close()
        return payloads

    def test_torn_tail_is_truncated(self):
        """A partial last record is cut off silently and appends resume on a boundary."""
        payloads = self.fill(5)
        last = segment_files(self.dir)[-1]
        size = os.path.getsize(last)
        with open(last, "ab") as f:
            f.write(encode_record(b"never finished", 1.0)[:13])
        sp = self.open(segment_bytes=100)
        self.assertEqual(os.path.getsize(last), size)
        self.assertEqual((sp.torn_bytes, sp.corrupt_records), (13, 0))
        sp.append([b"next"])
        self.assertEqual(read_all(sp), payloads + [b"next"])

    def test_flipped_byte_in_older_segment(self):
        """One corrupt record in the middle is skipped, counted and quarantined; the rest survive."""
        payloads = self.fill(12)
        seg = segment_files(self.dir)[1]
        flip_byte(seg, 50 + FRAME_OVERHEAD + 3)  # inside the 2nd record's payload
        sp = self.open(segment_bytes=100)
        self.assertEqual(sp.corrupt_records, 1)
        self.assertEqual(read_all(sp), payloads[:3] + payloads[4:])
        self.assertEqual(sp.pending_records, 11)
        qname = os.path.basename(seg)[:-4] + "-50.bad"
        qpath = os.path.join(self.dir, "quarantine", qname)
        with open(qpath, "rb") as f, open(seg, "rb") as g:
            self.assertEqual(f.read(), g.read()[50:100])

    def test_implausible_length_resyncs(self):
        """A garbled length field does not lose the records after it in the same segment."""
        payloads = self.fill(6, segment_bytes=1000)
        seg = segment_files(self.dir)[0]
        flip_byte(seg, 50 + 3)  # high byte of the 2nd record's length
        sp = self.open(segment_bytes=1000)
        self.assertEqual(read_all(sp), payloads[:1] + payloads[2:])
        self.assertEqual(sp.corrupt_records, 1)

    def test_corrupt_last_record_of_sealed_segment(self):
        """Damage at the very end of a sealed segment skips to the next segment."""
        payloads = self.fill(6)
        seg = segment_files(self.dir)[0]
        flip_byte(seg, 99)
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads[:1] + payloads[2:])
        self.assertEqual(sp.corrupt_records, 1)

    def test_random_garbage_segment(self):
        """A segment full of random bytes is quarantined quickly; neighbours are intact."""
        payloads = self.fill(6)
        segs = segment_files(self.dir)
        rnd = random.Random(42)
        with open(segs[1], "wb") as f:
            f.write(bytes(rnd.getrandbits(8) for _ in range(256 * 1024)))
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads[:2] + payloads[4:])
        self.assertEqual(sp.corrupt_records, 1)

    def test_garbage_between_records_of_last_segment(self):
        """Garbage followed by valid records in the newest segment is corruption, not a torn tail."""
        sp = self.open(segment_bytes=1 << 20)
        sp.append([b"one"])
        sp.close()
        seg = segment_files(self.dir)[0]
        with open(seg, "ab") as f:
            f.write(b"\x00" * 1000 + b"\xff" * 7 + encode_record(b"two", 2.0))
        sp = self.open(segment_bytes=1 << 20)
        self.assertEqual(read_all(sp), [b"one", b"two"])
        self.assertEqual((sp.corrupt_records, sp.torn_bytes), (1, 0))

    def test_corruption_found_while_reading(self):
        """Bit rot after open is skipped at read time, counted and quarantined once."""
        sp = self.open(segment_bytes=1000)
        payloads = [b"%d" % i * 10 for i in range(5)]
        sp.append(payloads)
        flip_byte(segment_files(self.dir)[0], (10 + FRAME_OVERHEAD) * 2 + FRAME_OVERHEAD)
        self.assertEqual(read_all(sp), payloads[:2] + payloads[3:])
        self.assertEqual(read_all(sp), payloads[:2] + payloads[3:])
        self.assertEqual(sp.corrupt_records, 1)
        self.assertEqual(len(os.listdir(os.path.join(self.dir, "quarantine"))), 1)

    def test_zero_length_segments(self):
        """Empty segment files (created, never written) are dropped in the middle and reused at the end."""
        payloads = self.fill(4)
        segs = segment_files(self.dir)
        first = int(os.path.basename(segs[0])[:-4])
        # Make room in the numbering: rename segment 1 upward, leave an empty file in the middle.
        os.rename(segs[1], os.path.join(self.dir, "%020d.seg" % (first + 5)))
        open(os.path.join(self.dir, "%020d.seg" % (first + 2)), "wb").close()
        open(os.path.join(self.dir, "%020d.seg" % (first + 9)), "wb").close()
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads)
        self.assertEqual(sp.corrupt_records, 0)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "%020d.seg" % (first + 2))))
        sp.append([b"z"])
        self.assertEqual(read_all(sp), payloads + [b"z"])

    def test_missing_metadata_replays_from_oldest(self):
        """Without meta.json every surviving segment is replayed: duplicates, never loss."""
        payloads = self.fill(6)
        sp = self.open(segment_bytes=100)
        recs = sp.read(3, 1 << 20)
        sp.ack(recs[-1][0])  # deletes the first segment, cursor mid-second
        sp.close()
        os.unlink(os.path.join(self.dir, "meta.json"))
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads[2:])

    def test_garbage_metadata(self):
        """Unparseable metadata, or metadata failing its CRC, counts as missing."""
        for garbage in (b"\x00\xffnot json", b'{"version": 1, "segment": 9, "offset": 0, "acked": 0, "crc": 1}', b""):
            shutil.rmtree(self.dir, True)
            payloads = self.fill(4)
            with open(os.path.join(self.dir, "meta.json"), "wb") as f:
                f.write(garbage)
            sp = self.open(segment_bytes=100)
            self.assertEqual(read_all(sp), payloads, garbage)
            sp.close()

    def test_cursor_not_on_a_boundary(self):
        """A well-formed cursor that is not a record boundary replays its segment from the start."""
        payloads = self.fill(4)
        seq = int(os.path.basename(segment_files(self.dir)[1])[:-4])
        doc = {"version": 1, "segment": seq, "offset": 7, "acked": 0, "crc": meta_mod.meta_crc(seq, 7, 0)}
        with open(os.path.join(self.dir, "meta.json"), "w") as f:
            json.dump(doc, f)
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads[2:])

    def test_stale_segment_behind_cursor_is_deleted(self):
        """A fully acked segment whose deletion was lost in a crash is removed, not replayed."""
        payloads = self.fill(6)
        first = segment_files(self.dir)[0]
        with open(first, "rb") as f:
            saved = f.read()
        sp = self.open(segment_bytes=100)
        sp.ack(sp.read(2, 1 << 20)[-1][0])
        sp.close()
        self.assertFalse(os.path.exists(first))
        with open(first, "wb") as f:
            f.write(saved)
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads[2:])
        self.assertFalse(os.path.exists(first))

    def test_cursor_segment_gone(self):
        """Metadata naming a deleted segment means it was fully acked: start at the next one."""
        payloads = self.fill(6)
        sp = self.open(segment_bytes=100)
        recs = sp.read(3, 1 << 20)
        sp.ack(recs[0][0])
        sp.close()
        os.unlink(segment_files(self.dir)[0])  # as if the deletion became durable first
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads[2:])

    def test_stray_files_are_ignored(self):
        """Leftover temp files and foreign names do not break open."""
        payloads = self.fill(2)
        for name in ("meta.json.tmp", "notes.txt", "abc.seg"):
            with open(os.path.join(self.dir, name), "w") as f:
                f.write("junk")
        sp = self.open(segment_bytes=100)
        self.assertEqual(read_all(sp), payloads)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "meta.json.tmp")))


_FSIZE_CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from relayd.spool.errors import SpoolWriteError
    from relayd.spool.spool import Spool
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    path, limit = sys.argv[1], int(sys.argv[2])
    sp = Spool.open(path, 1 << 30, segment_bytes=1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    ids, n, errors = [], 0, []
    while len(errors) < 2:
        batch = [b"%06d" % (n + i) + b"p" * 100 for i in range(3)]
        try:
            sp.append(batch)
            ids.extend(range(n, n + 3))
        except SpoolWriteError as e:
            errors.append(e.errno)
        n += 3
    seg = sorted(f for f in os.listdir(path) if f.endswith(".seg"))[-1]
    size_after_error = os.path.getsize(os.path.join(path, seg))
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space returns
    sp.append([b"%06d" % n + b"p" * 100])
    ids.append(n)
    sp.sync()
    seen = [int(p[:6]) for _, p in sp.read(10**6, 1 << 30)]
    sp.close()
    print(json.dumps({"ids": ids, "errors": errors, "seen": seen, "size": size_after_error}))
    """
)


class FullDiskTests(SpoolTestCase):
    """Write errors become SpoolWriteError and leave a consistent, usable log."""

    def test_file_size_limit(self):
        """EFBIG from RLIMIT_FSIZE mid-append: nothing partial stays, appends work once the limit lifts."""
        limit = 10000
        proc = subprocess.run(
            [sys.executable, "-c", _FSIZE_CHILD, self.dir, str(limit)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
            capture_output=True,
            timeout=120,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr.decode())
        result = json.loads(proc.stdout)
        self.assertEqual(result["errors"], [errno.EFBIG, errno.EFBIG])
        frame = 106 + FRAME_OVERHEAD
        self.assertEqual(result["size"] % frame, 0, "file ends on a record boundary")
        self.assertEqual(result["size"], (limit // (3 * frame)) * 3 * frame, "the failed batch left nothing")
        self.assertEqual(result["seen"], result["ids"])
        sp = self.open(segment_bytes=1 << 20)
        self.assertEqual([int(p[:6]) for p in read_all(sp)], result["ids"])
        self.assertEqual((sp.corrupt_records, sp.torn_bytes), (0, 0))

    def mount_tmpfs(self, size):
        """Mount a tiny tmpfs (needs root); skip the test where that is impossible."""
        mnt = os.path.join(self.base, "tmpfs")
        os.mkdir(mnt)
        if os.geteuid() != 0:
            self.skipTest("mounting a tmpfs needs root")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % size, "tmpfs", mnt], capture_output=True)
        if r.returncode != 0:
            self.skipTest("cannot mount tmpfs: %s" % r.stderr.decode().strip())
        self.addCleanup(subprocess.run, ["umount", "-l", mnt], capture_output=True)
        return mnt

    def test_enospc_on_tmpfs(self):
        """A real full file system (ENOSPC): the failed append leaves nothing, space returning heals it."""
        mnt = self.mount_tmpfs(256 * 1024)
        path = os.path.join(mnt, "spool")
        sp = self.open(path=path, max_bytes=1 << 30, segment_bytes=32 * 1024)
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        written = []
        failures = []
        n = 0
        while len(failures) < 3 and n < 10000:
            batch = [b"%06d" % (n + i) + b"e" * 500 for i in range(4)]
            try:
                sp.append(batch)
                written.extend(batch)
            except SpoolWriteError as e:
                failures.append(e.errno)
            n += 4
        self.assertEqual(set(failures), {errno.ENOSPC})
        self.assertEqual(read_all(sp), written)
        os.unlink(filler)
        sp.append([b"after"])
        sp.sync()
        sp.close()
        sp = self.open(path=path, max_bytes=1 << 30, segment_bytes=32 * 1024)
        self.assertEqual(read_all(sp), written + [b"after"])
        self.assertEqual((sp.corrupt_records, sp.torn_bytes), (0, 0))


class WriteErrorTests(SpoolTestCase):
    """Errors from the OS are translated without corrupting the log (simulated at the syscall)."""

    def test_eio_midway_through_multi_segment_append(self):
        """EIO after a new segment was created rolls back the old segment and removes the new one."""
        sp = self.open(segment_bytes=100)
        sp.append([b"a" * 34])
        real_pwrite = os.pwrite
        calls = []

        def failing_pwrite(fd, data, offset):
            calls.append(len(data))
            if len(calls) == 2:
                raise OSError(errno.EIO, "I/O error")
            return real_pwrite(fd, data, offset)

        self.patch(os, "pwrite", failing_pwrite)
        files_before = segment_files(self.dir)
        e = self.assertRaises(SpoolWriteError, sp.append, [b"b" * 34, b"c" * 34, b"d" * 34])
        self.assertEqual(e.errno, errno.EIO)
        self.assertEqual(segment_files(self.dir), files_before)
        self.assertEqual(os.path.getsize(files_before[0]), 50)
        self.patch(os, "pwrite", real_pwrite)
        sp.append([b"e"])
        self.assertEqual(read_all(sp), [b"a" * 34, b"e"])

    def test_failed_fsync_moves_writer_to_new_segment(self):
        """After an fsync error the segment is never written again (its pages may be gone)."""
        sp = self.open(segment_bytes=1 << 20)
        sp.append([b"a"])

        def failing(fd):
            raise OSError(errno.EIO, "I/O error")

        self.patch(segments_mod, "fdatasync", failing)
        self.assertRaises(SpoolWriteError, sp.sync)
        self.patch(segments_mod, "fdatasync", os.fsync)
        sp.append([b"b"])
        sp.sync()
        self.assertEqual(len(segment_files(self.dir)), 2)
        self.assertEqual(read_all(sp), [b"a", b"b"])
