"""Importing 5,000 JSONL lines: per-row paths (a commit per line) vs the bulk path (a transaction per batch).

"original_per_row" is the import as it was (sqlite-utils inserts, two commits a line), "per_row" is
Store.add_example per line today, "bulk" is tuning.data.importing.import_file. All run in the same process
on fresh SQLite files (WAL, as the bot opens them), alternating; the median of --repeats runs is printed
as JSON. Usage: .venv/bin/python bench/import_speed.py [--lines N] [--save bench/results/import_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import DuplicateExample, Store, open_db, question_hash  # noqa: E402
from tuning.data.formats import read_examples  # noqa: E402
from tuning.data.importing import IMPORT_BATCH, import_file  # noqa: E402


def sample_file(lines: int) -> bytes:
    """Distinct questions, a few with must_contain and a test split, like an exported FAQ."""
    rows = []
    for i in range(lines):
        row = {"question": f"How long does a parcel to zone {i} take, and what does it cost?",
               "answer": f"Parcels to zone {i} arrive in {2 + i % 5} working days and cost €{4 + i % 9}.90."}
        if i % 10 == 0:
            row.update(split="test", must_contain=[f"€{4 + i % 9}.90"])
        rows.append(json.dumps(row, ensure_ascii=False))
    return ("\n".join(rows) + "\n").encode("utf-8")


def per_row_import(store: Store, assistant_id: int, data: bytes) -> int:
    """The path before the bulk one: read the file, then Store.add_example for every record."""
    added = 0
    for record in read_examples(data, filename="bench.jsonl").records:
        try:
            store.add_example(assistant_id, record.question, record.answer, source="import", status="pending",
                              split=record.split,
                              must_contain=list(record.must_contain) if record.must_contain else None)
        except DuplicateExample:
            continue
        added += 1
    return added


def original_per_row_import(store: Store, assistant_id: int, data: bytes) -> int:
    """The per-row path as it was before this bench (commit 8115f60): sqlite-utils inserts, two commits a row."""
    added = 0
    for record in read_examples(data, filename="bench.jsonl").records:
        if store.find_duplicate(assistant_id, record.question) is not None:
            continue
        now = store.now()
        eid = store.db["examples"].insert({
            "assistant_id": assistant_id, "question": record.question, "answer": record.answer, "source": "import",
            "status": "pending", "split": record.split, "parent_id": None, "method": None,
            "author_id": None, "generation_run_id": None, "document_id": None, "chunk_ref": None,
            "judge_score": None, "must_contain": json.dumps(list(record.must_contain)) if record.must_contain else None,
            "question_hash": question_hash(record.question), "created_at": now, "updated_at": now}).last_pk
        store.db["example_history"].insert({"example_id": eid, "action": "create", "question": record.question,
                                            "answer": record.answer, "status": "pending", "changed_by": None,
                                            "changed_at": store.now()})
        store.get_example(eid)
        added += 1
    return added


PATHS = {
    "original_per_row": original_per_row_import,
    "per_row": per_row_import,
    "bulk": lambda store, aid, data: import_file(store, aid, data, filename="bench.jsonl").added,
}


def timed(path: Path, data: bytes, name: str) -> tuple[float, float, int]:
    """Seconds for the import, seconds for a re-import of the same file (all duplicates), rows added."""
    store = Store(open_db(path))
    aid = store.create_assistant("bench").id
    run = lambda: PATHS[name](store, aid, data)  # noqa: E731
    t0 = time.perf_counter()
    added = run()
    t1 = time.perf_counter()
    again = run()
    t2 = time.perf_counter()
    assert again == 0, again
    store.db.conn.close()
    return t1 - t0, t2 - t1, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", type=Path, help="also write the JSON here (bench/results/import_speed.json)")
    args = parser.parse_args()
    data = sample_file(args.lines)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in PATHS:
                runs[name].append(timed(Path(tmp) / f"{name}-{i}.db", data, name))
    result = {"lines": args.lines, "batch": IMPORT_BATCH, "repeats": args.repeats}
    for name, rows in runs.items():
        assert all(r[2] == args.lines for r in rows), rows
        result[f"{name}_import_s"] = round(statistics.median(r[0] for r in rows), 3)
        result[f"{name}_reimport_s"] = round(statistics.median(r[1] for r in rows), 3)
        result[f"{name}_ms_per_line"] = round(1000 * result[f"{name}_import_s"] / args.lines, 3)
    result["speedup_vs_original"] = round(result["original_per_row_import_s"] / result["bulk_import_s"], 1)
    result["speedup_vs_per_row"] = round(result["per_row_import_s"] / result["bulk_import_s"], 1)
    print(json.dumps(result, indent=2))
    if args.save:
        args.save.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
