"""Load synthetic voter-file records (JSON lines) into SQLite for Datasette.

Usage: python3 load.py RECORDS.jsonl OUT.db

One table, `electors`, with `elector_id` as its primary key and the columns in the records'
own order. Lists and objects (markers, flags, turnout, canvass_issues, consents) are stored as
JSON text; Datasette returns them as JSON when asked with `_json=COLUMN`.
"""
import json
import sqlite3
import sys


def main(src: str, out: str) -> None:
    with open(src, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit(f"no records in {src}")
    columns = list(records[0].keys())
    db = sqlite3.connect(out)
    db.execute("DROP TABLE IF EXISTS electors")
    cols = ", ".join(
        f'"{c}" TEXT PRIMARY KEY' if c == "elector_id" else f'"{c}"' for c in columns
    )
    db.execute(f"CREATE TABLE electors ({cols})")
    placeholders = ", ".join("?" for _ in columns)

    def cell(v):
        return json.dumps(v) if isinstance(v, (list, dict)) else v

    db.executemany(
        f"INSERT INTO electors VALUES ({placeholders})",
        ([cell(r.get(c)) for c in columns] for r in records),
    )
    db.commit()
    db.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
