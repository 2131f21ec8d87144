"""spark-submit entry point for `bcemb registry`: spark-submit jobs/registry.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["registry", *sys.argv[1:]]))
