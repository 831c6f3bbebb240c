from cycleml.cli import main

main()
