import sys

from megamesh.cli import main

sys.exit(main())
