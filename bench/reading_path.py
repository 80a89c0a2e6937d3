"""
bench/reading_path.py — how far a reader must follow one training step, counted.

    python bench/reading_path.py [--pairs] [--list]     # config/tiny.py on the CPU, ~2 minutes on 2 cores

A reader who follows `python train.py config/tiny.py` call by call walks the functions the run executes. This
script counts that walk with sys.setprofile, over the project's own files only (the root's scripts, kernels/;
not tests/, bench/, nor torch's or Python's code): every call and return that lands in another file than the
walk's last one is a *file switch*; every function, method, class body, module body, lambda or generator
expression entered counts once as a function (list, dict and set comprehensions do not: see INLINED). It runs

    python train.py config/tiny.py --eval_iters=1 --log_interval=1 --sample_prompt= --max_iters=N --eval_interval=N

at N = 2 and N = 4, each in a fresh process (so both import everything): start-up (imports, resolution,
allocation) is in both, and one training step is half the difference. It prints, for each run, the distinct
functions and files touched and the file switches, and the switches of one step; --pairs splits one step's
switches by (from file, to file); --list prints the functions of the N = 2 run, file by file.
"""
import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCLUDED = tuple(os.path.join(ROOT, d) + os.sep for d in ("tests", "bench"))
# Python 3.12 runs list, dict and set comprehensions inline (PEP 709), without a call of their own; so that the
# count does not depend on the interpreter, they are not counted as functions here (generators still are).
INLINED = ("<listcomp>", "<dictcomp>", "<setcomp>")


def own(filename):
    """The project's own source files: under the repository root, outside tests/ and bench/."""
    return filename.startswith(ROOT + os.sep) and not filename.startswith(EXCLUDED) and filename.endswith(".py")


def count(argv):
    """Run train.py with argv under a profiler: (distinct functions {(file, line, name)}, file switches)."""
    functions, state, pairs = set(), {"file": None, "switches": 0}, {}

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        if event == "return":  # the walk goes back to the nearest caller of our own
            frame = frame.f_back
            while frame is not None and not own(frame.f_code.co_filename):
                frame = frame.f_back
            if frame is None:
                return
        code = frame.f_code
        if not own(code.co_filename):
            return
        if event == "call" and code.co_name not in INLINED:
            functions.add((os.path.relpath(code.co_filename, ROOT), code.co_firstlineno, code.co_name))
        if code.co_filename != state["file"]:
            if state["file"] is not None:
                state["switches"] += 1
                pair = " -> ".join(os.path.relpath(f, ROOT) for f in (state["file"], code.co_filename))
                pairs[pair] = pairs.get(pair, 0) + 1
            state["file"] = code.co_filename

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path[0] = [os.path.join(ROOT, "train.py")] + argv, ROOT
    sys.setprofile(profile)
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    finally:
        sys.setprofile(None)
        sys.argv, sys.path[:] = saved_argv, saved_path
    return functions, state["switches"], pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/tiny.py")
    parser.add_argument("--list", action="store_true", help="print the functions of the 2-step run")
    parser.add_argument("--pairs", action="store_true", help="one step's switches by (from file, to file)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # one counted run
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.child is not None:
        functions, switches, pairs = count(args.child)
        print("COUNTED " + json.dumps([sorted(functions), switches, pairs]))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 4):
            argv = [args.config, "--eval_iters=1", "--log_interval=1", "--sample_prompt=", f"--max_iters={n}",
                    f"--eval_interval={n}", f"--out_dir={os.path.join(tmp, str(n))}"]
            out = subprocess.run([sys.executable, __file__, "--child"] + argv, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"train.py {' '.join(argv)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            functions, switches, pairs = json.loads(out.stdout.rsplit("COUNTED ", 1)[1])
            results[n] = ({tuple(f) for f in functions}, switches, pairs)
    print()
    for n, (functions, switches, _) in results.items():
        files = {f for f, _, _ in functions}
        print(f"{n} steps: {len(functions)} functions in {len(files)} files, {switches} file switches")
    print(f"one training step: {(results[4][1] - results[2][1]) / 2:g} file switches")
    if args.pairs:  # where one step's switches are: the pairs' counts, 4-step run minus 2-step run, halved
        step = {p: (c - results[2][2].get(p, 0)) / 2 for p, c in results[4][2].items()}
        for p, c in sorted(step.items(), key=lambda pc: -pc[1]):
            if c:
                print(f"{c:6g}  {p}")
    if args.list:
        by_file = {}
        for f, line, name in sorted(results[2][0]):
            by_file.setdefault(f, []).append(f"{name}:{line}")
        for f, names in by_file.items():
            print(f"{f} ({len(names)}): {', '.join(names)}")


if __name__ == "__main__":
    main()
