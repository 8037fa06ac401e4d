"""``python -m wsgi_proxy`` is the ``wsgi-proxy`` command."""

import sys

from .tools.cli import main

sys.exit(main())
