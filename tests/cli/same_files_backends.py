#!/usr/bin/python3
"""resonance-route writes the same files on every backend named: routes the same logits with each one, for
several configurations, and compares every .npy file byte for byte with the first backend's, and
stats.json too except the lines that name the backend, its instruction set and threads. Standard library
only.

usage: same_files_backends.py RESONANCE_ROUTE WORKDIR BACKEND BACKEND...
"""

import pathlib
import random
import shutil
import struct
import subprocess
import sys

NPY_FILES = ("probs.npy", "routing_map.npy", "expert_counts.npy", "expert_demand.npy", "expert_offsets.npy",
             "slot_token.npy")

# (name, options): token choice with each drop policy, dropless, the other directions; T and E cross the
# plan builder's 2048-candidate chunks.
CONFIGS = (
    ("token factor drop score", ["--top-k", "2", "--capacity-factor", "1.0"]),
    ("token factor drop position pad", ["--top-k", "2", "--capacity-factor", "0.5", "--drop", "position",
                                        "--pad-to-capacity"]),
    ("token factor drop random align", ["--top-k", "4", "--capacity-factor", "0.75", "--drop", "random", "--seed",
                                        "7", "--align", "8"]),
    ("token dropless align", ["--top-k", "4", "--align", "4"]),
    ("token sigmoid groups", ["--top-k", "4", "--score", "sigmoid", "--num-groups", "4", "--group-topk", "2",
                              "--capacity-factor", "1.25"]),
    ("expert choice", ["--direction", "expert", "--top-k", "2", "--capacity-factor", "1.0"]),
    ("bidirectional", ["--direction", "bidirectional", "--top-k", "2", "--capacity-factor", "0.75"]),
    ("causal bidirectional", ["--direction", "bidirectional", "--causal", "--top-k", "2", "--capacity-factor", "0.5"]),
    ("sinkhorn", ["--direction", "sinkhorn", "--top-k", "2", "--capacity-factor", "1.0", "--sinkhorn-iterations",
                  "20"]),
)

# Capacity schedulers read cosine logits (|logit| <= 1): routed on their own input.
COSINE_CONFIGS = (
    ("adaptive capacity", ["--top-k", "2", "--capacity", "adaptive"]),
    ("lower-bound capacity drop random", ["--top-k", "2", "--capacity", "lower-bound", "--drop", "random"]),
)


def save_npy(path, values, shape, dtype):
    """A C-order float32 ('<f4') or float64 ('<f8') array in the .npy 1.0 format."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (
        dtype, ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else ""))
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * (pad % 64) + "\n"
    code = "<%d%s" % (len(values), "f" if dtype == "<f4" else "d")
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(struct.pack(code, *values))


BACKEND_KEYS = ('"backend"', '"backend_requested"', '"isa"', '"threads"')


def without_backend_line(text):
    """stats.json without the lines that name the backend, its instruction set and its threads."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(BACKEND_KEYS))


def main():
    tool, work, backends = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    if len(backends) < 2:
        sys.exit("name at least two backends")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(20240611)
    T, E = 2100, 16
    # Quantised float32 logits (exact ties everywhere), Gaussian float64 ones, and cosine affinities.
    inputs = []
    for stem, dtype, draw, configs in (
        ("quantised", "<f4", lambda: rng.randint(-4, 4) * 0.5, CONFIGS),
        ("gaussian", "<f8", lambda: rng.gauss(0.0, 2.0), CONFIGS),
        ("cosine", "<f4", lambda: rng.uniform(-1.0, 1.0), COSINE_CONFIGS),
    ):
        path = work / (stem + ".npy")
        save_npy(path, [draw() for _ in range(T * E)], (T, E), dtype)
        inputs.append((path, configs))

    failures = []
    runs = 0
    for logits, configs in inputs:
        for name, options in configs:
            first = None
            for backend in backends:
                out = work / ("%s_%s_%s" % (logits.stem, name.replace(" ", "_"), backend))
                cmd = [tool, "--logits", str(logits), "--out", str(out), "--backend", backend] + options
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    failures.append("%s %s on %s: exit %d: %s" % (logits.name, name, backend, r.returncode,
                                                                 r.stderr.strip()))
                    break
                runs += 1
                stats = (out / "stats.json").read_text()
                if r.stdout != stats:
                    failures.append("%s %s on %s: stdout is not stats.json" % (logits.name, name, backend))
                if '"backend": "%s"' % backend not in stats:
                    failures.append("%s %s on %s: stats.json does not name the backend" % (logits.name, name, backend))
                files = {f: (out / f).read_bytes() for f in NPY_FILES}
                files["stats.json"] = without_backend_line(stats).encode()
                if first is None:
                    first = (backend, files)
                    continue
                for f, data in files.items():
                    if data != first[1][f]:
                        failures.append("%s %s: %s on %s differs from %s's" % (logits.name, name, f, backend,
                                                                              first[0]))
    for line in failures:
        print("FAIL:", line)
    if failures:
        sys.exit(1)
    print("%d runs: every backend (%s) wrote the same files" % (runs, ", ".join(backends)))


if __name__ == "__main__":
    main()
