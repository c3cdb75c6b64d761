from glitr_cli.cli import main

main()
