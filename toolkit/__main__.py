import sys

from toolkit.cli import main

sys.exit(main(sys.argv[1:]))
