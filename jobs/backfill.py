"""spark-submit entry point for `bcemb backfill`: spark-submit jobs/backfill.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["backfill", *sys.argv[1:]]))
