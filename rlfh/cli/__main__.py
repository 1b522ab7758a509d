from rlfh.cli.main import main

main()
