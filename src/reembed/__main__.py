import sys

from reembed.cli import main

sys.exit(main())
