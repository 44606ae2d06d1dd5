from triton_workbench.workbench.cli import main

raise SystemExit(main())
