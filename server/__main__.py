"""Run the server or any `softprompt` subcommand.

python -m server serve --host 127.0.0.1 --port 8000
"""

import sys

from server.cli import main

sys.exit(main())
