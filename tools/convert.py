"""HF ↔ megatron checkpoint conversion; see `r1mega/convert.py` (same CLI)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1mega.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
