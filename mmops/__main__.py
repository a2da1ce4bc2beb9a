from mmops.cli.main import main

main()
