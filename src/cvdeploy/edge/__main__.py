"""`python -m cvdeploy.edge`."""

from cvdeploy.edge.cli import main

raise SystemExit(main())
