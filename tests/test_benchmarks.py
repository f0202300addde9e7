"""The benchmarks run end to end and print what their readers parse (no speed is asserted here:
figures come from full runs, see README)."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_bench_transport_prints_its_ratios():
    out = subprocess.run(
        [sys.executable, "-m", "neuroarcade.cli", "bench", "transport", "--frames", "100", "--publish-seconds", "0.4",
         "--publish-rounds", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("rt_p50_ratio", "rt_p99_ratio", "publish_ratio", "publish_raw_pyzmq_ratio",
                "rt_ours_p50_us", "rt_raw_p50_us", "publish_ours_steps_per_s", "publish_raw_steps_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["publish_rounds"] == 2 and result["frames"] == 100
