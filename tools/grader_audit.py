"""Grader audit: the math reward on every benchmark's gold solutions, and on the known hard cases.

Own-gold acceptance and cross-gold false positives on each benchmark of the data directory, and each
case of `r1mega.rewards.audit.CASES` with its right value.

    python tools/grader_audit.py [--others 5] [--workers 2] [--min-own 0.99] [--max-cross 0.005]

Exit status 1 when a benchmark misses a threshold or a case has the wrong value.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from r1mega.eval.benchmarks import BENCHMARKS  # noqa: E402
from r1mega.rewards.audit import audit, check_cases  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    ap.add_argument("--others", type=int, default=5, help="other rows' golds per solution (cross-gold pairs)")
    ap.add_argument("--workers", type=int, default=2, help="grading processes")
    ap.add_argument("--seed", type=int, default=0, help="picks the cross-gold partners")
    ap.add_argument("--min-own", type=float, default=0.99)
    ap.add_argument("--max-cross", type=float, default=0.005)
    ap.add_argument("--show", type=int, default=10, help="failing rows printed per benchmark")
    args = ap.parse_args(argv)
    console = Console(highlight=False, width=110)

    results = audit(tuple(args.benchmarks), args.others, args.workers, args.seed)
    table = Table(title="Math grader on gold solutions (own-gold: accepted; cross-gold FP: other rows' golds accepted)")
    for col in ("benchmark", "rows", "graded", "own-gold", "cross pairs", "cross-gold FP", "seconds"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    ok = True
    for r in results:
        ok &= r.own_rate >= args.min_own and r.cross_rate <= args.max_cross
        table.add_row(r.name, str(r.rows), str(r.graded), f"{r.own_rate:.2%} ({r.own_accepted})", str(r.cross_pairs),
                      f"{r.cross_rate:.2%} ({r.cross_accepted})", f"{r.seconds:.1f}")
    console.print(table)
    for r in results:
        for f in r.failures[:args.show]:
            console.print(f"  {r.name} {f['kind']}: {f['id']}: gold {f['gold']!r}, stated {f['stated']!r}", markup=False)

    cases = Table(title="Known hard cases")
    for col in ("case", "right", "graded", ""):
        cases.add_column(col)
    for case, value in check_cases():
        ok &= value == case.expected
        cases.add_row(case.what, f"{case.expected:.0f}", f"{value:.0f}", "ok" if value == case.expected else "WRONG")
    console.print(cases)
    console.print(f"thresholds: own-gold >= {args.min_own:.1%}, cross-gold <= {args.max_cross:.1%}: "
                  f"{'all met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
