from qatune.cli import main

raise SystemExit(main())
