from meshd.cli import main

raise SystemExit(main())
