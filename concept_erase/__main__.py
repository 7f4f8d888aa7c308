import sys

from concept_erase.cli import main

sys.exit(main())
