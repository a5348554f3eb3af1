"""`python -m benchmarks [name ...]`: run the named benchmarks (all by default)."""
import argparse
import importlib

BENCHMARKS = {"zoning": "benchmarks.zoning", "zoning-precision": "benchmarks.zoning_precision",
              "data": "benchmarks.data", "train": "benchmarks.train",
              "sweep": "benchmarks.sweep", "hotpath": "benchmarks.hotpath",
              "gpu": "benchmarks.gpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    args = parser.parse_args()
    for name in args.names or BENCHMARKS:
        importlib.import_module(BENCHMARKS[name]).main(quick=args.quick)


if __name__ == "__main__":
    main()
