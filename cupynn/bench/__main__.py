"""``python -m cupynn.bench`` — the same as ``python -m cupynn bench``."""

from .cli import main

raise SystemExit(main())
