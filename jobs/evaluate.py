"""spark-submit entry point for `bcemb evaluate`: spark-submit jobs/evaluate.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
