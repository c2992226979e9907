from nexus_extproc.cli import main

raise SystemExit(main())
