"""The verdict of a GPU test run from its junit XML (benchmarks/gpu_check.sh): failures and errors listed,
and every SKIPPED CUDA test counted as a failure — on a GPU machine a CUDA test may not skip.
Exit status 0 only when nothing failed, nothing errored and no CUDA test skipped."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def verdict(path: str) -> tuple[list[str], dict]:
    """(the lines to print, the counts) of the junit file at ``path``."""
    root = ET.parse(path).getroot()
    lines, counts = [], {"passed": 0, "failed": 0, "error": 0, "cuda_skipped": 0, "other_skipped": 0}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            lines.append(f"FAILED {name}")
        elif "error" in kinds:
            counts["error"] += 1
            lines.append(f"ERROR {name}")
        elif "skipped" in kinds:
            if "cuda" in name.lower():
                counts["cuda_skipped"] += 1
                reason = case.find("skipped").get("message", "")
                lines.append(f"SKIPPED (counts as a failure) {name}: {reason}")
            else:
                counts["other_skipped"] += 1
        else:
            counts["passed"] += 1
    lines.insert(0, ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    return lines, counts


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python benchmarks/junit_verdict.py JUNIT.xml")
        return 2
    try:
        lines, counts = verdict(sys.argv[1])
    except (OSError, ET.ParseError) as exc:
        print(f"no junit results: {exc}")
        return 1
    print("\n".join(lines))
    bad = counts["failed"] + counts["error"] + counts["cuda_skipped"]
    return 1 if bad or counts["passed"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
