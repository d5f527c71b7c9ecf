"""`python -m triview`: the triview CLI."""
import sys

from triview.cli import main

sys.exit(main())
