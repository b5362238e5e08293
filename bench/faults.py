"""The fault battery's counts: malformed inputs walked through the ``w2s`` command line.

Runs every case of ``tests/fault_cases.py`` (the list ``tests/test_fault_battery.py`` asserts on) in a
temporary folder and prints how many inputs were tried and how many got a clear one-line error, a traceback,
a silent acceptance (exit status 0) or something else (several lines, a message that does not say what and
where, files written). ``--verbose`` prints every case's outcome and error line.

Run ``python bench/faults.py`` (offline, CPU; a few seconds).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_cases():
    spec = importlib.util.spec_from_file_location("fault_cases", REPO / "tests" / "fault_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_cases"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    """Run the battery and print its counts; exit status 1 when any input did not get a clear error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="print every case's outcome")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="w2s-faults-") as tmp:
        # offline, no progress bars, and nothing written to the user's home
        os.environ.update(
            HOME=str(Path(tmp) / "home"),
            HF_HOME=str(Path(tmp) / "home" / "hf"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            W2S_PROGRESS="0",
            CUDA_VISIBLE_DEVICES="",
        )
        faults = _load_cases()
        started = time.perf_counter()
        outcomes = faults.run_battery(Path(tmp) / "cases")
        seconds = time.perf_counter() - started
    counts = Counter(o.kind for o in outcomes)
    groups = Counter(c.group for c in faults.CASES)
    print(f"fault battery: {platform.python_version()} on {platform.machine()}, {seconds:.1f} s")
    print(
        f"  inputs tried        {len(outcomes)}  ({', '.join(f'{g} {n}' for g, n in sorted(groups.items()))})"
    )
    print(f"  clear errors        {counts['clear']}")
    print(f"  tracebacks          {counts['traceback']}")
    print(f"  silent acceptances  {counts['silent']}")
    print(f"  other (unclear)     {counts['unclear']}")
    for o in outcomes:
        if args.verbose or o.kind != "clear":
            line = o.stderr.strip().splitlines()[-1] if o.stderr.strip() else ""
            print(f"  [{o.kind}] {o.case}: {line}")
            if o.kind != "clear" and o.changed:
                print(f"      changed: {', '.join(o.changed)}")
    return 0 if counts["clear"] == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
