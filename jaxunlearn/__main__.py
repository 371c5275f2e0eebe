import sys

from jaxunlearn.cli import main

sys.exit(main())
