"""`python -m fusedreg env | build | bench`."""
from .cli import main

raise SystemExit(main())
