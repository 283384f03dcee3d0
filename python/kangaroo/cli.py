"""`kangaroo` command line (subcommands land with the decoder)."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    print("kangaroo: the decoder CLI (generate, train, demo, bench) is not implemented yet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
