from kvfuse._cli import main

raise SystemExit(main())
