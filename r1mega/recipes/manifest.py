"""The run directory's record of a multi-stage recipe: which stages finished, what they produced.

`manifest.json` maps stage name -> {"status": "done", "outputs": {...paths}, "summary": {...}}. It is
rewritten atomically after each stage, so a restart skips exactly the stages that completed and
re-enters the interrupted one (which resumes from its own checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path

from r1mega.checkpoint.atomic import write_text
from r1mega.parallel.state import barrier, is_rank0


class Manifest:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "manifest.json"
        self.stages: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("status") == "done"

    def outputs(self, stage: str) -> dict:
        if not self.done(stage):
            raise RuntimeError(f"stage {stage!r} has not finished in {self.path.parent} (manifest: {sorted(self.stages)})")
        return self.stages[stage]["outputs"]

    def finish(self, stage: str, outputs: dict, summary: dict) -> None:
        self.stages[stage] = {"status": "done", "outputs": {k: str(v) for k, v in outputs.items()}, "summary": summary}
        if is_rank0():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(self.stages, indent=2))
        barrier()
