"""Per-candidate results on disk: one JSON file each, written atomically, so a killed search
resumes without redoing finished work."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class CandidateCache:
    """OUTPUT/candidates/<name>/result.json; `update` merges fields and stamps `<field>_at` times."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "candidates"

    def dir(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str) -> dict[str, Any]:
        path = self.dir(name) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        record = self.get(name)
        now = time.time()
        record.update(fields)
        record.update({f"{key}_at": now for key in fields})
        path = self.dir(name) / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)  # atomic: a crash leaves the old record or the new one
        return record
