"""`python -m cvdeploy` runs the CLI."""

from cvdeploy.cli import main

main()
