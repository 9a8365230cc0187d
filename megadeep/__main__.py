from megadeep.cli import main

raise SystemExit(main())
