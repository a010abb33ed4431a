"""`python -m fastlm info | tune` (also the `fastlm` console script)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlm", description="fastlm command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend can serve each op (and why not)")
    tune = sub.add_parser("tune", help="measure every backend per op and size bucket on this GPU and write the "
                                       "user's dispatch cache, which auto then prefers (like cuDNN benchmark mode)")
    tune.add_argument("--ops", default=None, help="comma-separated ops to measure (default: all tuned ops)")
    tune.add_argument("--quick", action="store_true", help="one size per op family instead of the full sweep")
    tune.add_argument("--device", default="cuda", help="the CUDA device to measure (default: cuda)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastlm import info

        info.main()
    elif args.command == "tune":
        from fastlm import backend
        from fastlm.dispatch import tune as tuning

        ops = args.ops.split(",") if args.ops else None
        unknown = [o for o in ops or () if o not in backend.ops()]
        if unknown:
            parser.error(f"tune --ops: unknown op(s) {', '.join(unknown)}; choose from {', '.join(backend.ops())}")
        return tuning.main(ops, args.quick, args.device, progress=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
