"""`python -m dvlm`: the same as the `dvlm` command."""

from dvlm.cli import main

raise SystemExit(main())
