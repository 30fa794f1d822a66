from edgelm.cli.main import main

raise SystemExit(main())
