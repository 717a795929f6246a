from ddppo.launch.cli import main

raise SystemExit(main())
