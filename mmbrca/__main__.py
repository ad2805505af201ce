from mmbrca.cli import main

main()
