"""`python -m fastlm.bench [...]`: the benchmark report (see benchmarks/__main__.py for options).

The benchmark modules live in the source tree's benchmarks/ folder, next to this package, so
this entry point works from a source checkout or an editable install."""
import os
import sys


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
        print("fastlm.bench: the benchmarks/ folder is not next to the fastlm package; "
              "run it from a source checkout (git clone, then `bash scripts/bench.sh`)", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.__main__ import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
