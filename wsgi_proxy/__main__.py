"""``python -m wsgi_proxy`` is the ``wsgi-proxy`` command."""

import sys

from .cli import main

sys.exit(main())
