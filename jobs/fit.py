"""spark-submit entry point for `bcemb fit`: spark-submit jobs/fit.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
