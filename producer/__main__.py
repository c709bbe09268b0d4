"""`python -m producer` is the `sdfarm` command."""

from producer.cli import main

raise SystemExit(main())
