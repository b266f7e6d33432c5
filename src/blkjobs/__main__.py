from blkjobs.cli.main import main

raise SystemExit(main())
