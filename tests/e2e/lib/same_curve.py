"""Checks that a distributed run trained the single-process loss curve.

  same_curve.py REF_METRICS RUN_METRICS STEPS [RTOL]

Both files are metrics.jsonl; rank 0's losses of steps 1..STEPS are
compared step by step (the summed gradients of the workers are the
single-process big-batch gradient, so only float summation order may
differ), within RTOL (default 2e-4) of the first step's loss. The run must
hold exactly those steps; the reference may go on (a run stopped early is
compared with a reference stopped later). Exits 1 on a mismatch.
"""
import json
import sys


def losses(path):
    out = {}
    for line in open(path):
        j = json.loads(line)
        if j.get("kind") == "step" and j.get("rank", 0) == 0:
            out[j["step"]] = j["loss"]
    return out


def main():
    ref_path, run_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rtol = float(sys.argv[4]) if len(sys.argv) > 4 else 2e-4
    ref, run = losses(ref_path), losses(run_path)
    want = list(range(1, steps + 1))
    if sorted(run) != want or any(s not in ref for s in want):
        print("FAIL: steps differ: want 1..%d, reference has %d, run has %d (first missing or extra: %s)"
              % (steps, len(ref), len(run), sorted(set(run) ^ set(want))[:5]))
        return 1
    tol = rtol * max(1.0, ref[1])
    worst = max(abs(run[s] - ref[s]) for s in want)
    print("loss curve: max |diff| %.2e over %d steps (tolerance %.1e)" % (worst, steps, tol))
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
