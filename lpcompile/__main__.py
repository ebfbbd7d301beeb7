import sys

from lpcompile.cli import main

sys.exit(main())
