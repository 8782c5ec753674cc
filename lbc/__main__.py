from lbc.cli import main

main()
