"""spark-submit entry point for `bcemb run`: spark-submit jobs/run.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
