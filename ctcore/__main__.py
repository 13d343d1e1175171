from ctcore.cli import main

main()
