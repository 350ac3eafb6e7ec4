"""Manage the prompt store from the shell.

python -m prompt_store --store ./prompt-store list
python -m prompt_store show math
python -m prompt_store alias math-prod math-v2
"""

import sys

from prompt_store.cli import main

sys.exit(main())
