"""Stream ``pytest -v --tb=no -rf`` output of the parity tests as a markdown table: a row per fixture run and check
as soon as pytest reports it (so a run cut short still leaves its rows), then the failure reasons.

    E2P_PARITY_DEVICE=cuda python -m pytest -v --tb=no -rf tests/test_parity.py -k official_run \\
        | python bench/parity_table.py

Exit status 1 if any check failed or none ran.
"""

import re
import sys

RESULT_LINE = re.compile(r"\S+::test_(?P<test>\w+?)(?:\[(?P<params>[^\]]*)\])? (?P<result>PASSED|FAILED|ERROR|SKIPPED)")
SUMMARY_LINE = re.compile(r"(?P<result>FAILED|ERROR) \S+::test_(?P<test>\w+?)(?:\[(?P<params>[^\]]*)\])? - (?P<why>.*)")


def main() -> int:
    print("| check | fixture run - weights | result |", flush=True)
    print("|---|---|---|", flush=True)
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    reasons = []
    for line in sys.stdin:
        line = line.rstrip()
        if match := SUMMARY_LINE.match(line):
            reasons.append(f"* {match['test']} [{match['params'] or ''}]: {match['why'][:200]}")
        elif match := RESULT_LINE.match(line):
            counts[match["result"]] += 1
            print(f"| {match['test']} | {match['params'] or ''} | {match['result'].lower()} |", flush=True)
    failed = counts["FAILED"] + counts["ERROR"]
    print(f"\n{counts['PASSED']} passed, {failed} failed, {counts['SKIPPED']} skipped.")
    if reasons:
        print("\n" + "\n".join(reasons))
    return 1 if failed or not counts["PASSED"] else 0


if __name__ == "__main__":
    sys.exit(main())
