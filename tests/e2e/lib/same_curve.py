"""Checks that a distributed run trained the single-process loss curve.

  same_curve.py REF_METRICS RUN_METRICS STEPS

Both files are metrics.jsonl; rank 0's step losses are compared step by step
(the summed gradients of the workers are the single-process big-batch
gradient, so only float summation order may differ). Exits 1 on a mismatch.
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
    ref, run = losses(ref_path), losses(run_path)
    if len(ref) != steps or sorted(run) != sorted(ref):
        print("FAIL: steps differ: reference %s, run %s" % (sorted(ref), sorted(run)))
        return 1
    tol = 2e-4 * max(1.0, ref[1])
    worst = max(abs(run[s] - ref[s]) for s in ref)
    print("loss curve: max |diff| %.2e over %d steps (tolerance %.1e)" % (worst, len(ref), tol))
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
