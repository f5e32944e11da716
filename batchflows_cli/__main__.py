from batchflows_cli import main

main()
