"""spark-submit entry point for `bcemb maintain`: spark-submit jobs/maintain.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))
