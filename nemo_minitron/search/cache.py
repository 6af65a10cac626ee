"""Per-candidate results on disk: one JSON file each, written atomically, so a killed search
resumes without redoing finished work."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nemo_minitron.atomic import write_text


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
        write_text(path, json.dumps(record, indent=2, default=str) + "\n")
        return record
