"""``python -m raftkv`` runs the CLI (the test cluster starts nodes this way)."""

from raftkv.cli import main

main()
