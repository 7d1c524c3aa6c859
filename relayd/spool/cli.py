"""``relayd spool inspect|verify DIR``: look at a spool directory from a shell.

Both commands are read-only (they neither lock nor repair the directory), so
they are safe to run next to a live daemon; a record being written at that
moment may then show up as a torn tail.

* ``inspect`` prints segments, record and byte counts and the age of the
  oldest unacknowledged record.
* ``verify`` checks the CRC of every record.  Exit status: 0 when clean (a
  torn tail of the newest segment, which the next open truncates, is only a
  note), 1 when a corrupt range was found, 2 on usage errors or an
  unreadable directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from relayd.spool.errors import SpoolDirectoryError
from relayd.spool.inspection import ScanReport, scan_directory

EXIT_OK = 0
EXIT_CORRUPT = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd spool", description="Inspect or verify a relayd spool directory.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_ in (
        ("inspect", "summarise segments, pending records and bytes, oldest record age"),
        ("verify", "check every record's CRC; exit 1 on corruption"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument("dir", metavar="DIR", help="the spool directory (one worker's)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _summary(report: ScanReport, now: float) -> Dict[str, Any]:
    age = None if report.oldest_timestamp is None else max(0.0, now - report.oldest_timestamp)
    return {
        "segments": len(report.segments),
        "records": sum(s.records for s in report.segments),
        "bytes": sum(s.size for s in report.segments),
        "pending_records": report.pending_records,
        "pending_bytes": report.pending_bytes,
        "oldest_record_age_seconds": age,
        "cursor": {"segment": report.cursor[0], "offset": report.cursor[1]},
        "metadata_ok": report.meta_ok,
        "corrupt_ranges": report.corrupt_ranges,
        "torn_tail_bytes": _torn_bytes(report),
        "segment_list": [
            {
                "sequence": s.sequence,
                "size": s.size,
                "records": s.records,
                "corrupt_ranges": [list(r) for r in s.corrupt_ranges],
                "torn_tail": s.torn_tail,
            }
            for s in report.segments
        ],
    }


def _torn_bytes(report: ScanReport) -> int:
    if not report.segments or report.segments[-1].torn_tail is None:
        return 0
    last = report.segments[-1]
    return last.size - (last.torn_tail or 0)


def _corrupt_problems(report: ScanReport) -> List[str]:
    """Every range that verify counts as corruption, one line each."""
    lines = []
    for i, s in enumerate(report.segments):
        for start, end in s.corrupt_ranges:
            lines.append("segment %d: corrupt range [%d, %d) (%d bytes)" % (s.sequence, start, end, end - start))
        if s.torn_tail is not None and i != len(report.segments) - 1:
            lines.append("segment %d: unreadable from offset %d to its end (%d)" % (s.sequence, s.torn_tail, s.size))
    return lines


def main(argv: List[str], out: Optional[TextIO] = None, clock: Callable[[], float] = time.time) -> int:
    """Run ``relayd spool ARGV``; returns the exit status.

    ``out`` and ``clock`` exist for tests (defaults: stdout, wall clock).
    """
    out = sys.stdout if out is None else out
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        report = scan_directory(args.dir)
    except SpoolDirectoryError as e:
        out.write("relayd spool: %s\n" % (e,))
        return EXIT_USAGE
    summary = _summary(report, clock())
    problems = _corrupt_problems(report)
    if args.command == "inspect":
        if args.json:
            out.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        else:
            age = summary["oldest_record_age_seconds"]
            out.write("spool %s\n" % (args.dir,))
            out.write("  segments:        %d (%d bytes)\n" % (summary["segments"], summary["bytes"]))
            out.write("  records:         %d on disk, %d pending\n" % (summary["records"], summary["pending_records"]))
            out.write("  pending bytes:   %d\n" % (summary["pending_bytes"],))
            out.write("  oldest pending:  %s\n" % ("-" if age is None else "%.1f s ago" % (age,)))
            out.write(
                "  read cursor:     segment %d offset %d%s\n"
                % (report.cursor[0], report.cursor[1], "" if report.meta_ok else " (metadata missing/invalid)")
            )
            for s in report.segments:
                flags = []
                if s.corrupt_ranges:
                    flags.append("%d corrupt range(s)" % len(s.corrupt_ranges))
                if s.torn_tail is not None:
                    flags.append("torn from %d" % s.torn_tail)
                out.write(
                    "  %020d.seg  %10d bytes  %8d records%s\n"
                    % (s.sequence, s.size, s.records, ("  " + ", ".join(flags)) if flags else "")
                )
        return EXIT_OK
    # verify
    if args.json:
        out.write(json.dumps({"ok": not problems, "problems": problems, **summary}, indent=2, sort_keys=True) + "\n")
    else:
        for line in problems:
            out.write(line + "\n")
        torn = _torn_bytes(report)
        if torn:
            out.write("note: %d byte(s) of torn tail in the newest segment; the next open truncates them\n" % torn)
        out.write(
            "%s: %d segment(s), %d record(s) checked, %d corrupt range(s)\n"
            % ("CORRUPT" if problems else "OK", summary["segments"], summary["records"], len(problems))
        )
    return EXIT_CORRUPT if problems else EXIT_OK
