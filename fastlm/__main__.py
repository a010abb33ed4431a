"""`python -m fastlm info` (also the `fastlm` console script)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlm", description="fastlm command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend can serve each op (and why not)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastlm import info

        info.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
