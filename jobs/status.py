"""spark-submit entry point for `bcemb status`: spark-submit jobs/status.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["status", *sys.argv[1:]]))
