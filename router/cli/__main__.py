"""`python -m router.cli ...` is `router ...`."""

from router.cli.main import main

raise SystemExit(main())
