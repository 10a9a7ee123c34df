from cdmap.cli import main

main()
