"""spark-submit entry point for `bcemb demo`: spark-submit jobs/demo.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
