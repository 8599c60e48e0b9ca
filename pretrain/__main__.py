"""`python -m pretrain ...` is the `pretrain` command."""

from pretrain.cli import main

raise SystemExit(main())
