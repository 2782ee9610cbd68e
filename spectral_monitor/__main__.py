from spectral_monitor.cli import main

raise SystemExit(main())
