from bench.launch.sim import main

raise SystemExit(main())
