"""Cost report from the output of `jobs/classify.py`: `python jobs/report.py --input OUTPUT_DIR`.

Writes report.md, a self-contained report.html, the plots as PNG and summary.json into --out, and
prints a short summary. Argument parsing only; the work is in `adainfer_ray.report`.

Compare mode: pass a second run with --compare (for instance a `--policy full` run over the same
corpus). Both --input and --compare take one or more folders, read as one run each. When the
--compare run was made with `--policy full`, the full-depth cost is measured from it instead of
estimated from FLOPs.
"""

import argparse
import os
import sys

try:
    import adainfer_ray  # noqa: F401
except ImportError:  # run from a checkout without installing: put the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adainfer_ray import report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python jobs/report.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input", nargs="+", required=True,
        help="output folder(s) or URI(s) of jobs/classify.py (local, s3://, gs://, memory://); "
             "several are read as parts of one run")
    parser.add_argument("--out", default="report/", help="local folder to write the report into")
    prices = "; ".join(f"{name}: {report.PRICE_CURRENCY} {p:.2f}/h, {src}" for name, (p, src) in
                       report.DEVICE_PRICES.items())
    parser.add_argument(
        "--price-per-hour", "--price-per-gpu-hour", dest="price", default=None,
        help=f"hourly price of the device the run used, in {report.PRICE_CURRENCY} (a number), or a device "
             f"name to price the run as that device (default: %(default)s = the run's own device from its "
             f"sidecar; a CPU run then has no price). Known devices: {prices}")
    parser.add_argument("--gpu", default=None,
                        help="name of the device the price is for, printed in the report (default: %(default)s = "
                             "the run's own)")
    parser.add_argument(
        "--compare", nargs="+", default=None,
        help="a second run's folder(s) to compare against: label agreement by id, accuracy "
             "against gold_label, throughput ratio; a --policy full run also gives the measured "
             "full-depth cost")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = report.write_report(args.input, args.out, price_per_gpu_hour=args.price,
                                     gpu=args.gpu, compare=args.compare)
    except (FileNotFoundError, ValueError) as error:  # a missing --input, an unknown device: usage errors
        parser.error(str(error))
    print(report.terminal_summary(result, args.out))


if __name__ == "__main__":
    main()
