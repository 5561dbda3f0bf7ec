import sys

from tfssl.cli import main

sys.exit(main())
