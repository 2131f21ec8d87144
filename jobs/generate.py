"""spark-submit entry point for `bcemb generate`: spark-submit jobs/generate.py --config conf/FILE.yaml"""

import sys

from bclib.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
