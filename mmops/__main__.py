from mmops.cli import main

main()
