"""``python -m studies`` runs the reproduction study CLI (see studies/reproduce.py)."""

from studies.reproduce import main

raise SystemExit(main())
