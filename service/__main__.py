"""`python -m service` is the `tollgate` command."""

from service.cli import main

raise SystemExit(main())
