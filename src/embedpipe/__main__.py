import sys

from embedpipe.cli import main

sys.exit(main())
