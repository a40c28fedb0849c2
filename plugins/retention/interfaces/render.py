"""Text for people: aligned tables, counts with units, short timestamps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from retention.evidence.payload import ERASURE_PAYLOAD_TYPE


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()) -> str:
    """An aligned plain-text table; columns listed in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else shown(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for number, row in enumerate(cells):
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
        if number == 0:
            lines.append("  ".join("─" * w for w in widths))
    return "\n".join(lines)


def shown(text: str) -> str:
    """``text`` with control and invisible characters escaped (``\\x1b``): a value read from the audit
    database must not move the terminal's cursor, clear it or start a new line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def count(n: int | None, unit: str = "record") -> str:
    """``1 record``, ``12,345 records``; ``?`` when unknown."""
    if n is None:
        return "?"
    return f"{n:,} {unit}{'' if n == 1 else 's'}"


def size(n: int | None) -> str:
    """``12.3 MiB``; empty when a target has no byte count (tables)."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def rate(rows: int, seconds: float) -> str:
    """``312k rows/s``."""
    if seconds <= 0:
        return "–"
    per = rows / seconds
    if per >= 10_000:
        return f"{per / 1000:,.0f}k rows/s"
    return f"{per:,.0f} rows/s"


def moment(value: datetime | str) -> str:
    """``2026-11-30 14:24:30Z``: to the second, in UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def describe_certificate(certificate) -> str:
    """One certificate in full, for a person reviewing it (the signed payload is the record)."""
    data = certificate.data
    if data.get("type") == ERASURE_PAYLOAD_TYPE:
        return describe_erasure_certificate(certificate)
    out = [f"certificate {certificate.seq}: {certificate.category}, {certificate.status}"]

    def line(label: str, text: str) -> None:
        out.append(f"  {label:<10} {text}")

    line("run", f"{certificate.run_id}")
    line("rule", f"{data['rule']['path']} (sha256 {data['rule']['sha256'][:16]}…), {data['code_version']}")
    line("action", f"{data['action']} records older than {moment(data['cutoff'])} (as of {moment(data['as_of'])})")
    issuer = f" by {data['issued_by']}" if data.get("issued_by") else ""
    line("ran", f"{moment(data['started_at'])} → {moment(data['finished_at'])}, "
                f"issued {moment(data['issued_at'])}{issuer}")
    if data.get("approval"):
        approval = data["approval"]
        line("approval", f"over its limit, approved by {approval.get('by', '?')}: {approval.get('reason', '')}")
    if data.get("holds"):
        line("holds", "honoured legal holds " + ", ".join(f"#{h}" for h in data["holds"]))
    if data.get("archive"):
        archive = data["archive"]
        line("archive", f"{archive['manifest']} ({count(archive.get('objects'), 'object')}, "
                        f"sha256 {archive['sha256'][:16]}…)")
    if data.get("archive_error"):
        line("archive", f"manifest not written: {data['archive_error']}")
    line("signed", f"key {certificate.key_id[:16]}…; entry {certificate.entry_hash[:16]}…, "
                   f"after {certificate.prev_hash[:16]}…")
    out.append("")
    purged = {"anonymize": "ANONYMIZED", "archive": "ARCHIVED"}.get(data["action"], "DELETED")
    rows, tables = [], []
    for t in data.get("targets", []):
        done = t.get("anonymized", t["deleted"])
        counted = t.get("counted", True)  # False: the plan failed before counting; 0 is not a count
        rows.append([t["name"], t["location"], t["status"], f"{t['matched']:,}" if counted else "?", f"{done:,}",
                     f"{t.get('held', 0):,}", f"{t['failed']:,}" if counted else "?", size(t.get("bytes")),
                     t.get("error") or ""])
        if len(t.get("tables") or {}) > 1:
            tables.append(f"  {t['name']}: " + ", ".join(f"{name} {n:,}" for name, n in t["tables"].items()))
    out.append(table(["TARGET", "LOCATION", "STATUS", "MATCHED", purged, "HELD", "FAILED", "BYTES", "ERROR"], rows,
                     right=(3, 4, 5, 6, 7)))
    if tables:
        out.append("rows per table (children with their parent):")
        out.extend(tables)
    return "\n".join(out)


def describe_erasure_certificate(certificate) -> str:
    """An erasure certificate in full: the request, the subject's HMAC, and each target's outcome."""
    data = certificate.data
    subject = data["subject"]
    out = [f"certificate {certificate.seq}: erasure request {data['request']} (attempt {data['attempt']}), "
           f"{certificate.status}",
           f"  subject    {subject['type']} HMAC {subject['hmac']} (hash key {subject['hash_key_id']})",
           f"  request    {data['reason']}, received {moment(data['received_at'])}, due {data['due']}",
           f"  signed     key {certificate.key_id[:16]}…; entry {certificate.entry_hash[:16]}…, "
           f"after {certificate.prev_hash[:16]}…", ""]
    rows = [[t["name"], t["location"], t["outcome"], f"{t['deleted'] + t['anonymized']:,}", f"{t['held']:,}",
             ", ".join(h["case"] for h in t.get("holds", [])) or t.get("reason") or t.get("error") or ""]
            for t in data["targets"]]
    out.append(table(["TARGET", "LOCATION", "OUTCOME", "RECORDS", "HELD", "WHY"], rows, right=(3, 4)))
    return "\n".join(out)
