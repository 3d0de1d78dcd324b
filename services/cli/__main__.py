"""python -m services.cli (the same as the blixctl command)."""

from services.cli.main import main

raise SystemExit(main())
